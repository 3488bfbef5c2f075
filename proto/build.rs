fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/kiln.proto");
    tonic_build::configure().compile_protos(&["proto/kiln.proto"], &["proto"])?;
    Ok(())
}
