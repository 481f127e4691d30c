//! A blocking reader over segments arriving on an async channel: the apply thread reads
//! the overlay as a stream while the network task receives it. The channel is bounded,
//! so at most a few segments wait in memory.

use std::io::Read;

use tokio::sync::mpsc::Receiver;

pub struct SegmentPipe {
    rx: Receiver<Vec<u8>>,
    cur: Vec<u8>,
    pos: usize,
}

impl SegmentPipe {
    pub fn new(rx: Receiver<Vec<u8>>) -> Self {
        Self { rx, cur: Vec::new(), pos: 0 }
    }
}

impl Read for SegmentPipe {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.pos == self.cur.len() {
            match self.rx.blocking_recv() {
                Some(next) => {
                    self.cur = next;
                    self.pos = 0;
                }
                None => return Ok(0), // sender gone: end of the overlay
            }
        }
        let n = buf.len().min(self.cur.len() - self.pos);
        buf[..n].copy_from_slice(&self.cur[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}
