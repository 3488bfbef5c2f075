fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/kiln.proto");
    println!("cargo:rerun-if-changed=proto/onnx.proto");
    tonic_build::configure()
        .compile_protos(&["proto/kiln.proto", "proto/onnx.proto"], &["proto"])?;
    Ok(())
}
