#!/usr/bin/env python3
"""vision: a face-detection service for forage guests (OpenCV from Debian's packages:
python3-opencv, and opencv-data's Haar cascades).

Protocol, one line each way (as hashsearch's):
    faces <base64 image>    ->  ok faces=<n> boxes=<x:y:w:h,...> size=<w>x<h> served=<count> ms=<elapsed>
    faces-file <sample>     ->  the same, for an image the app ships in samples/
    count                   ->  ok served=<count>
    anything else           ->  error <reason>

Faces are found with OpenCV's frontal-face Haar cascade; boxes are sorted left to right.
`served` counts the requests answered since the service started.
"""
import base64
import binascii
import os
import re
import socketserver
import sys
import threading
import time

import cv2
import numpy

MAX_LINE = 32 << 20
CASCADE = "/usr/share/opencv4/haarcascades/haarcascade_frontalface_default.xml"
SAMPLES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "samples")
lock = threading.Lock()
served = 0
detector = cv2.CascadeClassifier(CASCADE)
if detector.empty():
    sys.exit("vision: cannot load %s (opencv-data installed?)" % CASCADE)


def detect(data):
    image = cv2.imdecode(numpy.frombuffer(data, dtype=numpy.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError("not an image OpenCV can read")
    gray = cv2.equalizeHist(cv2.cvtColor(image, cv2.COLOR_BGR2GRAY))
    with lock:  # one classifier, shared
        found = detector.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5, minSize=(32, 32))
    boxes = sorted(tuple(int(v) for v in b) for b in found)
    return boxes, image.shape[1], image.shape[0]


def answer(line):
    global served
    verb, _, arg = line.strip().partition(" ")
    if verb == "count":
        with lock:
            return "ok served=%d" % served
    if verb == "faces":
        try:
            data = base64.b64decode(arg.strip(), validate=True)
        except (binascii.Error, ValueError) as e:
            return "error the image is not base64: %s" % e
    elif verb == "faces-file":
        name = arg.strip()
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
            return "error a sample is named by a plain file name"
        try:
            with open(os.path.join(SAMPLES, name), "rb") as f:
                data = f.read()
        except OSError as e:
            return "error no sample %s: %s" % (name, e.strerror)
    else:
        return "error unknown request (faces BASE64 | faces-file NAME | count)"
    start = time.monotonic()
    try:
        boxes, width, height = detect(data)
    except ValueError as e:
        return "error %s" % e
    with lock:
        served += 1
        count = served
    ms = int((time.monotonic() - start) * 1000)
    listed = ",".join("%d:%d:%d:%d" % b for b in boxes) or "-"
    return "ok faces=%d boxes=%s size=%dx%d served=%d ms=%d" % (len(boxes), listed, width, height, count, ms)


class Handler(socketserver.StreamRequestHandler):
    def handle(self):
        while True:
            line = self.rfile.readline(MAX_LINE)
            if not line:
                return
            if not line.endswith(b"\n"):
                self.wfile.write(b"error request line too long\n")
                return
            self.wfile.write(answer(line.decode("ascii", errors="replace")).encode() + b"\n")


class Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


if __name__ == "__main__":
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 8082
    with Server(("0.0.0.0", port), Handler) as server:
        print("vision: listening on port %d (OpenCV %s)" % (port, cv2.__version__), file=sys.stderr, flush=True)
        server.serve_forever()
