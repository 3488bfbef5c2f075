//! What the CUDA paths share (compiled with the `cuda` feature only): the NCCL
//! all-reduce ([`crate::collective::nccl`]) and the GPU trainer
//! ([`crate::train::gpu`]) call libcuda, libnccl, libcublas and libnvrtc through
//! cudarc, which opens each library on first use and panics when it or a symbol is
//! missing. Before a first call, each path checks here that the libraries load
//! under the names cudarc searches, and runs every cudarc call through
//! [`guarded`], so that a missing library is an error naming it, never a panic.
//!
//! cudarc searches unversioned names and those of CUDA 12 (`libcublas.so`,
//! `libcublas.so.12`, ...). A machine with only another major version's soname
//! (CUDA 13's `libcublas.so.13`, or NCCL's `libnccl.so.2`) gets an error saying
//! so, and how to link the name cudarc opens.

use std::panic::{catch_unwind, AssertUnwindSafe};

/// A CUDA library cudarc opens at run time.
#[derive(Debug, Clone, Copy)]
pub struct Library {
    /// The name in errors, as "libcublas".
    pub label: &'static str,
    /// cudarc's name, as "cublas".
    pub cudarc_name: &'static str,
    /// Versioned names that cudarc does not open but that may be installed.
    pub other_sonames: &'static [&'static str],
    /// How to install it.
    pub install: &'static str,
    /// cudarc's own search for it (its `sys::is_culib_present`).
    pub present: unsafe fn() -> bool,
}

impl Library {
    /// Returns whether cudarc's search finds the library.
    #[allow(unsafe_code)]
    pub fn loads(&self) -> bool {
        // SAFETY: `present` is a cudarc `is_culib_present`: it loads the library,
        // which runs its initialisers as cudarc's first call would, calls nothing
        // through it and closes it.
        unsafe { (self.present)() }
    }
}

/// Checks that libcuda (the driver) loads under a name cudarc searches.
#[allow(unsafe_code)]
pub fn check_driver() -> Result<(), String> {
    // SAFETY: loading libcuda runs its initialisers, as cudarc's first call to
    // the driver would; nothing is called through the handle, which is closed.
    if unsafe { cudarc::driver::sys::is_culib_present() } {
        return Ok(());
    }
    Err(format!(
        "no CUDA driver: libcuda could not be loaded (searched {}; LD_LIBRARY_PATH={}): \
         install the NVIDIA driver, or add the directory holding libcuda.so.1 to \
         LD_LIBRARY_PATH",
        searched_names("cuda"),
        ld_library_path()
    ))
}

/// Checks that cudarc's search finds `library`; the error names it, the names
/// searched, and how to install or link it.
pub fn check_library(library: Library) -> Result<(), String> {
    if library.loads() {
        return Ok(());
    }
    let found = library
        .other_sonames
        .iter()
        .copied()
        .find(|name| loads(name));
    let hint = match found {
        Some(soname) => format!(
            "{soname} loads, but cudarc opens only unversioned or CUDA 12 names: link \
             {}.so to it in a directory on LD_LIBRARY_PATH",
            library.label
        ),
        None => library.install.to_string(),
    };
    Err(format!(
        "{} not found (searched {}; LD_LIBRARY_PATH={}): {hint}",
        library.label,
        searched_names(library.cudarc_name),
        ld_library_path()
    ))
}

/// Returns the file names cudarc tries for `lib`, each once.
pub fn searched_names(lib: &str) -> String {
    let mut names = cudarc::get_lib_name_candidates(lib);
    let mut seen = std::collections::HashSet::new();
    names.retain(|name| seen.insert(name.clone()));
    names.join(", ")
}

fn ld_library_path() -> String {
    std::env::var("LD_LIBRARY_PATH").unwrap_or_else(|_| "<unset>".into())
}

/// Returns whether the dynamic loader finds the library file `name`.
#[allow(unsafe_code)]
pub fn loads(name: &str) -> bool {
    // SAFETY: loading a CUDA library runs its initialisers and nothing more; the
    // handle is closed at once and no symbol is called.
    unsafe { libloading::Library::new(name) }.is_ok()
}

/// Runs a cudarc call, turning its panics (a missing library or symbol) into an
/// error that names `op`.
pub fn guarded<T>(op: &str, f: impl FnOnce() -> T) -> Result<T, String> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|payload| {
        let message = kiln_common::panic_message(payload.as_ref());
        format!("{op}: cudarc panicked: {message}")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOWHERE: Library = Library {
        label: "libkiln-absent",
        cudarc_name: "kiln-absent",
        other_sonames: &["libkiln-absent.so.7"],
        install: "install it from nowhere",
        present: || false,
    };

    #[test]
    fn a_missing_library_is_named_with_what_was_searched_and_how_to_install_it() {
        let everywhere = Library {
            present: || true,
            ..NOWHERE
        };
        assert!(check_library(everywhere).is_ok());
        let err = check_library(NOWHERE).expect_err("absent");
        assert!(err.starts_with("libkiln-absent not found"), "{err}");
        assert!(err.contains("libkiln-absent.so"), "{err}");
        assert!(err.contains("LD_LIBRARY_PATH"), "{err}");
        assert!(err.contains("install it from nowhere"), "{err}");
    }

    #[test]
    fn a_panicking_call_is_an_error_naming_the_operation() {
        let err = guarded("open the thing", || panic!("symbol missing")).expect_err("panic");
        assert_eq!(err, "open the thing: cudarc panicked: symbol missing");
        assert_eq!(guarded("add", || 2 + 2), Ok(4));
    }
}
