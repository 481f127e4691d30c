//! Cluster objects read from etcd (`forage_cluster::resources::decode`): Node and
//! Instance documents with their size, kind, name and list caps.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    use forage_cluster::resources::{decode, ClusterInstance, Node};
    if let Ok(n) = decode::<Node>("/forage/v1/f/nodes/x", data) {
        // What was accepted encodes to an object accepted again.
        let again = serde_json::to_vec(&n).unwrap();
        assert!(decode::<Node>("k", &again).is_ok());
    }
    let _ = decode::<ClusterInstance>("/forage/v1/f/instances/x/y", data);
});
