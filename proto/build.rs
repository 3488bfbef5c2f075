fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/kiln.proto");
    println!("cargo:rerun-if-changed=proto/onnx.proto");
    println!("cargo:rerun-if-changed=proto/inference.proto");
    tonic_build::configure()
        // Tensor contents as `bytes::Bytes`, so that they reach the engine and
        // return to the wire without a copy.
        .bytes([".inference"])
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
