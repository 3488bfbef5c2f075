//! Discovery of what this machine offers: CPU cores, memory, the disk that holds the
//! data directory, and GPUs through NVML.
//!
//! Everything here blocks (it reads `/proc`, calls `statvfs`, loads the NVML
//! library), so callers run it on a blocking thread. A machine without NVIDIA's
//! library or driver simply has no GPUs: that is the normal case on a CPU worker,
//! logged at debug, never an error.

use std::path::{Path, PathBuf};

use kiln_proto::v1::{Gpu, Resources};
use nvml_wrapper::Nvml;
use sysinfo::{CpuRefreshKind, DiskRefreshKind, Disks, MemoryRefreshKind, System};

/// Probes the host once at start and then refreshes the cheap, changing part (free
/// disk space) on request.
#[derive(Debug)]
pub struct ResourceProbe {
    data_dir: PathBuf,
    disks: Disks,
    /// Index in `disks` of the filesystem that holds the data directory.
    data_disk: Option<usize>,
}

impl ResourceProbe {
    /// Discovers the machine's resources; `data_dir` should exist so that its real
    /// path (links resolved) can be matched against the mount points.
    pub fn discover(data_dir: &Path) -> (ResourceProbe, Resources) {
        let data_dir = std::fs::canonicalize(data_dir).unwrap_or_else(|_| data_dir.to_path_buf());
        let disks =
            Disks::new_with_refreshed_list_specifics(DiskRefreshKind::nothing().with_storage());
        let data_disk = pick_disk(disks.list().iter().map(|d| d.mount_point()), &data_dir);
        let (disk_bytes, disk_free_bytes) = match data_disk.and_then(|i| disks.list().get(i)) {
            Some(disk) => (disk.total_space(), disk.available_space()),
            None => {
                tracing::debug!(data_dir = %data_dir.display(), "no mounted filesystem holds the data dir; reporting no disk");
                (0, 0)
            }
        };
        let gpus = discover_gpus();
        // ONNX Runtime runs on this machine's GPUs when its library has CUDA and
        // CUDA numbers the GPUs as NVML does (a replica's GPU index is NVML's).
        let ordinals = cuda_numbers_as_nvml(
            std::env::var("CUDA_VISIBLE_DEVICES").ok().as_deref(),
            std::env::var("CUDA_DEVICE_ORDER").ok().as_deref(),
        );
        let gpu_engines = match ordinals {
            Err(why) if !gpus.is_empty() => {
                tracing::warn!("serving on GPUs is off: {why}");
                Vec::new()
            }
            Ok(()) if !gpus.is_empty() && crate::serving::engine::onnxruntime::has_cuda() => {
                vec![crate::serving::engine::EngineKind::OnnxRuntime
                    .name()
                    .to_string()]
            }
            _ => Vec::new(),
        };
        let resources = Resources {
            cpu_cores: cpu_cores(),
            memory_bytes: memory_bytes(),
            disk_bytes,
            disk_free_bytes,
            gpus,
            gpu_engines,
            engines: crate::serving::engine::EngineKind::available()
                .into_iter()
                .map(|e| e.name().to_string())
                .collect(),
            // Filled by the worker once it knows its cgroups.
            memory_limits: String::new(),
        };
        tracing::info!(
            cpu_cores = resources.cpu_cores,
            memory_bytes = resources.memory_bytes,
            disk_bytes,
            disk_free_bytes,
            gpus = resources.gpus.len(),
            gpu_engines = ?resources.gpu_engines,
            "discovered resources"
        );
        (
            ResourceProbe {
                data_dir,
                disks,
                data_disk,
            },
            resources,
        )
    }

    /// Returns the free bytes of the data directory's filesystem, read afresh; `None`
    /// when that filesystem is unknown or cannot be read now.
    pub fn refresh_disk_free(&mut self) -> Option<u64> {
        let disk = self.disks.list_mut().get_mut(self.data_disk?)?;
        if !disk.refresh_specifics(DiskRefreshKind::nothing().with_storage()) {
            tracing::debug!(data_dir = %self.data_dir.display(), "refresh of the data disk failed");
            return None;
        }
        Some(disk.available_space())
    }
}

/// Returns the index of the mount point that is the longest prefix of `path`
/// (compared component by component, so `/data` does not hold `/database`).
pub fn pick_disk<'a>(
    mount_points: impl IntoIterator<Item = &'a Path>,
    path: &Path,
) -> Option<usize> {
    mount_points
        .into_iter()
        .enumerate()
        .filter(|(_, mount)| path.starts_with(mount))
        .max_by_key(|(_, mount)| mount.components().count())
        .map(|(i, _)| i)
}

/// Counts the cores this process may use: the standard library honours CPU affinity
/// and cgroup quotas, which is what a container is actually given.
fn cpu_cores() -> u32 {
    let cores = match std::thread::available_parallelism() {
        Ok(n) => n.get(),
        Err(_) => {
            let mut system = System::new();
            system.refresh_cpu_list(CpuRefreshKind::nothing());
            system.cpus().len().max(1)
        }
    };
    u32::try_from(cores).unwrap_or(u32::MAX)
}

/// Returns the total memory, lowered to the cgroup's limit when one is set.
fn memory_bytes() -> u64 {
    let mut system = System::new();
    system.refresh_memory_specifics(MemoryRefreshKind::nothing().with_ram());
    let total = system.total_memory();
    match system.cgroup_limits() {
        Some(limits) if limits.total_memory > 0 => total.min(limits.total_memory),
        _ => total,
    }
}

/// Lists the NVIDIA GPUs; any NVML failure means no GPUs.
/// Whether CUDA's device ordinals in this process are NVML's indices, which is
/// what replicas are placed by: not when CUDA_VISIBLE_DEVICES hides or reorders
/// devices, nor when CUDA orders them other than by PCI bus (NVML's order; the
/// kiln CLI sets CUDA_DEVICE_ORDER=PCI_BUS_ID when it is unset).
fn cuda_numbers_as_nvml(visible: Option<&str>, order: Option<&str>) -> Result<(), String> {
    if let Some(visible) = visible {
        return Err(format!(
            "CUDA_VISIBLE_DEVICES={visible} renumbers the GPUs CUDA sees; unset it for the \
             worker (replicas get their GPUs from the scheduler)"
        ));
    }
    match order {
        None | Some("PCI_BUS_ID") => Ok(()),
        Some(other) => Err(format!(
            "CUDA_DEVICE_ORDER={other} numbers GPUs unlike NVML; use PCI_BUS_ID"
        )),
    }
}

fn discover_gpus() -> Vec<Gpu> {
    let nvml = match Nvml::init() {
        Ok(nvml) => nvml,
        Err(err) => {
            tracing::debug!(error = %err, "nvml unavailable; no gpus");
            return Vec::new();
        }
    };
    let count = match nvml.device_count() {
        Ok(count) => count,
        Err(err) => {
            tracing::debug!(error = %err, "nvml cannot count devices; no gpus");
            return Vec::new();
        }
    };
    let mut gpus = Vec::new();
    for index in 0..count {
        let device = match nvml.device_by_index(index) {
            Ok(device) => device,
            Err(err) => {
                tracing::warn!(index, error = %err, "skip gpu nvml cannot open");
                continue;
            }
        };
        gpus.push(Gpu {
            index,
            name: device.name().unwrap_or_default(),
            uuid: device.uuid().unwrap_or_default(),
            memory_bytes: device.memory_info().map(|m| m.total).unwrap_or(0),
        });
    }
    gpus
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpus_are_served_only_where_cuda_numbers_them_as_nvml() {
        assert_eq!(cuda_numbers_as_nvml(None, None), Ok(()));
        assert_eq!(cuda_numbers_as_nvml(None, Some("PCI_BUS_ID")), Ok(()));
        let hidden = cuda_numbers_as_nvml(Some("1,0"), None).expect_err("renumbered");
        assert!(hidden.contains("CUDA_VISIBLE_DEVICES=1,0"), "{hidden}");
        let fastest = cuda_numbers_as_nvml(None, Some("FASTEST_FIRST")).expect_err("reordered");
        assert!(fastest.contains("use PCI_BUS_ID"), "{fastest}");
    }

    fn pick(mounts: &[&str], path: &str) -> Option<usize> {
        pick_disk(mounts.iter().map(Path::new), Path::new(path))
    }

    #[test]
    fn longest_mount_prefix_wins() {
        let mounts = ["/", "/data", "/data/kiln", "/boot"];
        assert_eq!(pick(&mounts, "/data/kiln/worker-1"), Some(2));
        assert_eq!(pick(&mounts, "/data/other"), Some(1));
        assert_eq!(pick(&mounts, "/home/me/kiln"), Some(0));
        // The order of the list does not matter.
        assert_eq!(pick(&["/data/kiln", "/", "/data"], "/data/kiln/x"), Some(0));
    }

    #[test]
    fn prefixes_match_whole_components() {
        assert_eq!(pick(&["/", "/data"], "/database/kiln"), Some(0));
        assert_eq!(pick(&["/data"], "/database/kiln"), None);
    }

    #[test]
    fn no_mount_holds_a_relative_path() {
        assert_eq!(pick(&["/", "/data"], "kiln-worker"), None);
        assert_eq!(pick(&[], "/data"), None);
    }

    #[test]
    fn discovery_reports_this_machine() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (_probe, resources) = ResourceProbe::discover(dir.path());
        assert!(resources.cpu_cores >= 1);
        assert!(resources.memory_bytes > 0);
        assert!(resources.disk_free_bytes <= resources.disk_bytes);
    }
}
