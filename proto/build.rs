fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/kiln.proto");
    println!("cargo:rerun-if-changed=proto/onnx.proto");
    println!("cargo:rerun-if-changed=proto/inference.proto");
    tonic_build::configure()
        // Tensor contents and uploaded chunks as `bytes::Bytes`, so that they reach
        // the engine or the chunk store, and return to the wire, without a copy.
        .bytes([".inference", ".kiln.v1.PutChunksRequest.data"])
        // Maps in key order: a record encodes to the same bytes on every
        // coordinator (a HashMap's order differs from process to process), and
        // texts built by walking a map (a rejection naming fields) read the same.
        .btree_map([".kiln.v1"])
        .compile_protos(
            &[
                "proto/kiln.proto",
                "proto/onnx.proto",
                "proto/inference.proto",
            ],
            &["proto"],
        )?;
    Ok(())
}
