//! The VMs in a file snapshot: every folder below its root that holds a
//! `.vmx` is a VM folder (as on an ESXi datastore), described the way a
//! backup source is ([`crate::repo::source::scan`]).

use std::collections::VecDeque;
use std::fs;
use std::path::{Path, PathBuf};

use tracing::warn;

use super::{SnapResult, SnapshotError, SnapshotFile, SnapshotVm};
use crate::repo::source::{scan, vmx_memsize};
use crate::repo::FileKind;

/// Folder levels searched below the root: datastores keep VM folders at
/// the top, sometimes grouped one or two levels down.
const MAX_DEPTH: usize = 3;
/// A `.vmx` larger than this is not a VM configuration.
const MAX_VMX_LEN: u64 = 1 << 20;

/// The VMs below `root`, by folder name order. Symlinks are not followed;
/// hidden folders (`.lck-*`, `.snapshots`) are skipped; a VM folder that
/// cannot be read is left out with a warning.
pub fn vms_in_folder(root: &Path) -> SnapResult<Vec<SnapshotVm>> {
    let mut vms = Vec::new();
    let mut queue: VecDeque<(PathBuf, usize)> = VecDeque::from([(root.to_path_buf(), 0)]);
    while let Some((dir, depth)) = queue.pop_front() {
        let mut subdirs = Vec::new();
        let mut has_vmx = false;
        let entries = fs::read_dir(&dir).map_err(|source| SnapshotError::Io {
            action: "list snapshot folder",
            path: dir.clone(),
            source,
        })?;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            if kind.is_dir() && !name.starts_with('.') {
                subdirs.push(entry.path());
            } else if kind.is_file() && name.to_ascii_lowercase().ends_with(".vmx") {
                has_vmx = true;
            }
        }
        // The root is the datastore itself, never a VM folder.
        if has_vmx && depth > 0 {
            match describe(root, &dir) {
                Ok(vm) => vms.push(vm),
                Err(cause) => {
                    warn!(folder = %dir.display(), %cause, "VM folder in snapshot not readable; left out")
                }
            }
            continue;
        }
        if depth < MAX_DEPTH {
            subdirs.sort();
            queue.extend(subdirs.into_iter().map(|d| (d, depth + 1)));
        }
    }
    vms.sort_by(|a, b| a.folder.cmp(&b.folder));
    Ok(vms)
}

fn describe(root: &Path, dir: &Path) -> Result<SnapshotVm, String> {
    let source = scan(dir).map_err(|e| e.to_string())?;
    let folder = dir
        .strip_prefix(root)
        .map_err(|e| e.to_string())?
        .to_string_lossy()
        .into_owned();
    let memory_mib = source
        .files
        .iter()
        .find(|f| f.kind == FileKind::Vmx && f.size <= MAX_VMX_LEN)
        .and_then(|f| fs::read_to_string(&f.path).ok())
        .and_then(|text| vmx_memsize(&text));
    Ok(SnapshotVm {
        name: source.vm,
        folder,
        files: source
            .files
            .iter()
            .map(|f| SnapshotFile {
                name: f.name.clone(),
                size: f.size,
                disk: f.kind.is_disk(),
            })
            .collect(),
        memory_mib,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_folders_are_found_by_their_vmx() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        for (folder, name) in [("web01", "web01"), ("group/db01", "db01")] {
            let d = root.join(folder);
            fs::create_dir_all(&d).unwrap();
            fs::write(d.join(format!("{name}.vmx")), "memSize = \"256\"\n").unwrap();
            fs::write(d.join(format!("{name}-flat.vmdk")), vec![0u8; 4096]).unwrap();
        }
        // Not VMs: the root's own .vmx, a hidden folder, a symlinked folder.
        fs::write(root.join("stray.vmx"), "memSize = \"1\"\n").unwrap();
        fs::create_dir_all(root.join(".lck-1")).unwrap();
        fs::write(root.join(".lck-1/x.vmx"), "").unwrap();
        std::os::unix::fs::symlink(root.join("web01"), root.join("link")).unwrap();
        let vms = vms_in_folder(root).unwrap();
        let found: Vec<(&str, &str)> = vms
            .iter()
            .map(|v| (v.name.as_str(), v.folder.as_str()))
            .collect();
        assert_eq!(found, [("db01", "group/db01"), ("web01", "web01")]);
        let web = &vms[1];
        assert_eq!(web.memory_mib, Some(256));
        let disk = web.files.iter().find(|f| f.disk).unwrap();
        assert_eq!((disk.name.as_str(), disk.size), ("web01-flat.vmdk", 4096));
    }
}
