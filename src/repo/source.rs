//! Backup sources: a VM folder as ESXi stores it, or a single disk image.
//!
//! Scanning checks everything that can be checked before the first byte is
//! stored (files readable, VMDK extents present), so bad input fails without
//! touching the repository.

use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};

use super::manifest::FileKind;
use super::RepoError;

/// First line of a VMDK text descriptor.
const DESCRIPTOR_SIGNATURE: &[u8] = b"# Disk DescriptorFile";
/// Descriptors are small text files; anything larger is not one.
const MAX_DESCRIPTOR_LEN: u64 = 64 * 1024;

/// One file to back up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceFile {
    /// Where it is read from.
    pub path: PathBuf,
    /// Name inside the VM folder.
    pub name: String,
    /// Its role.
    pub kind: FileKind,
    /// Size at scan time.
    pub size: u64,
}

/// A scanned backup source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    /// VM name suggested by the source (the `.vmx` stem, else the folder or file name).
    pub vm: String,
    /// Files in name order.
    pub files: Vec<SourceFile>,
}

fn source_err(path: &Path) -> impl FnOnce(std::io::Error) -> RepoError + '_ {
    move |source| RepoError::Source {
        path: path.to_path_buf(),
        source,
    }
}

/// Whether `path` is backed up as a folder tree: with `force` (`--tree`) any
/// folder is; otherwise a folder is a tree when it has subfolders or symlinks
/// and no `.vmx` file. A VM folder (a `.vmx`, or only regular files) and a
/// single file keep the VM format.
///
/// # Errors
/// A missing or unreadable path; `force` on something that is not a folder.
pub fn is_tree(path: &Path, force: bool) -> Result<bool, RepoError> {
    let meta = fs::metadata(path).map_err(source_err(path))?;
    if !meta.is_dir() {
        if force {
            return Err(RepoError::BadSource {
                path: path.to_path_buf(),
                reason: "not a folder; only a folder can be backed up as a tree".into(),
            });
        }
        return Ok(false);
    }
    if force {
        return Ok(true);
    }
    let mut nested = false;
    for entry in fs::read_dir(path).map_err(source_err(path))? {
        let entry = entry.map_err(source_err(path))?;
        let p = entry.path();
        let kind = entry.file_type().map_err(source_err(&p))?;
        let name = entry.file_name();
        if kind.is_file()
            && name
                .to_string_lossy()
                .to_ascii_lowercase()
                .ends_with(".vmx")
        {
            return Ok(false);
        }
        nested |= kind.is_dir() || kind.is_symlink();
    }
    Ok(nested)
}

/// Scans a VM folder or a single image file.
///
/// # Errors
/// A missing or unreadable path, an empty folder, or a VMDK descriptor whose
/// extent is missing.
pub fn scan(path: &Path) -> Result<Source, RepoError> {
    let meta = fs::metadata(path).map_err(source_err(path))?;
    let stem = |p: &Path| {
        p.file_stem()
            .or_else(|| p.file_name())
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "vm".to_string())
    };
    if meta.is_file() {
        let file = describe(path)?;
        if file.kind == FileKind::Descriptor {
            check_extents(path, path.parent().unwrap_or(Path::new(".")))?;
        }
        return Ok(Source {
            vm: stem(path),
            files: vec![file],
        });
    }
    if !meta.is_dir() {
        return Err(RepoError::BadSource {
            path: path.to_path_buf(),
            reason: "neither a folder nor a regular file".into(),
        });
    }
    let mut files = Vec::new();
    for entry in fs::read_dir(path).map_err(source_err(path))? {
        let entry = entry.map_err(source_err(path))?;
        let p = entry.path();
        // ESXi's .lck-* lock folders and other subfolders are not VM data.
        if entry.file_type().map_err(source_err(&p))?.is_file() {
            files.push(describe(&p)?);
        }
    }
    if files.is_empty() {
        return Err(RepoError::BadSource {
            path: path.to_path_buf(),
            reason: "the folder holds no files".into(),
        });
    }
    files.sort_by(|a, b| a.name.cmp(&b.name));
    for f in files.iter().filter(|f| f.kind == FileKind::Descriptor) {
        check_extents(&f.path, path)?;
    }
    let vm = files
        .iter()
        .find(|f| f.kind == FileKind::Vmx)
        .map(|f| stem(&f.path))
        .unwrap_or_else(|| stem(path));
    Ok(Source { vm, files })
}

/// Opens a file (so unreadable files fail now) and classifies it.
fn describe(path: &Path) -> Result<SourceFile, RepoError> {
    let mut f = File::open(path).map_err(source_err(path))?;
    let size = f.metadata().map_err(source_err(path))?.len();
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| RepoError::BadSource {
            path: path.to_path_buf(),
            reason: "no file name".into(),
        })?;
    let lower = name.to_ascii_lowercase();
    let kind = if lower.ends_with("-flat.vmdk") {
        FileKind::FlatDisk
    } else if lower.ends_with(".vmdk") {
        let mut head = [0u8; DESCRIPTOR_SIGNATURE.len()];
        let n = f.read(&mut head).map_err(source_err(path))?;
        if size <= MAX_DESCRIPTOR_LEN && head[..n] == *DESCRIPTOR_SIGNATURE {
            FileKind::Descriptor
        } else {
            FileKind::DiskImage
        }
    } else if lower.ends_with(".vmx") {
        FileKind::Vmx
    } else if lower.ends_with(".nvram") {
        FileKind::Nvram
    } else if lower.ends_with(".log") {
        FileKind::Log
    } else if [".img", ".raw", ".qcow2", ".vhd", ".vhdx"]
        .iter()
        .any(|ext| lower.ends_with(ext))
    {
        FileKind::DiskImage
    } else {
        FileKind::Other
    };
    Ok(SourceFile {
        path: path.to_path_buf(),
        name,
        kind,
        size,
    })
}

/// Extent file names in a VMDK descriptor (`RW 41943040 VMFS "web01-flat.vmdk"`).
pub fn descriptor_extents(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| {
            ["RW ", "RDONLY ", "NOACCESS "]
                .iter()
                .any(|p| l.starts_with(p))
        })
        .filter_map(|l| {
            let start = l.find('"')? + 1;
            let len = l[start..].find('"')?;
            Some(l[start..start + len].to_string())
        })
        .collect()
}

/// `memsize = "2048"` of a `.vmx` file: the VM's memory in MiB.
pub fn vmx_memsize(vmx: &str) -> Option<u64> {
    vmx.lines().find_map(|line| {
        let (key, value) = line.split_once('=')?;
        if !key.trim().eq_ignore_ascii_case("memsize") {
            return None;
        }
        value.trim().trim_matches('"').parse().ok()
    })
}

fn check_extents(descriptor: &Path, folder: &Path) -> Result<(), RepoError> {
    let text = fs::read_to_string(descriptor).map_err(source_err(descriptor))?;
    for extent in descriptor_extents(&text) {
        // Extent names are relative to the descriptor's folder; one with a path
        // separator could point anywhere, so treat it as missing here.
        let present = !extent.contains('/') && folder.join(&extent).is_file();
        if !present {
            return Err(RepoError::MissingExtent {
                descriptor: descriptor.to_path_buf(),
                extent,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DESCRIPTOR: &str = "# Disk DescriptorFile\nversion=1\nCID=fffffffe\n\
        createType=\"vmfs\"\n\n# Extent description\nRW 524288 VMFS \"web01-flat.vmdk\"\n";

    #[test]
    fn memsize_is_read_from_vmx() {
        let vmx = ".encoding = \"UTF-8\"\nmemSize = \"2048\"\nnumvcpus = \"2\"\n";
        assert_eq!(vmx_memsize(vmx), Some(2048));
        assert_eq!(vmx_memsize("numvcpus = \"2\"\n"), None);
        assert_eq!(vmx_memsize("memsize = \"lots\"\n"), None);
    }

    #[test]
    fn extents_are_parsed() {
        assert_eq!(descriptor_extents(DESCRIPTOR), vec!["web01-flat.vmdk"]);
    }

    #[test]
    fn folder_is_classified_and_named_after_vmx() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        fs::write(d.join("web01.vmx"), "displayName = \"web01\"\n").unwrap();
        fs::write(d.join("web01.vmdk"), DESCRIPTOR).unwrap();
        fs::write(d.join("web01-flat.vmdk"), vec![0u8; 4096]).unwrap();
        fs::write(d.join("web01.nvram"), b"nv").unwrap();
        fs::write(d.join("vmware.log"), b"log").unwrap();
        fs::create_dir(d.join(".lck-0000000000000001")).unwrap();
        let src = scan(d).unwrap();
        assert_eq!(src.vm, "web01");
        let kinds: Vec<_> = src
            .files
            .iter()
            .map(|f| (f.name.as_str(), f.kind))
            .collect();
        assert_eq!(
            kinds,
            vec![
                ("vmware.log", FileKind::Log),
                ("web01-flat.vmdk", FileKind::FlatDisk),
                ("web01.nvram", FileKind::Nvram),
                ("web01.vmdk", FileKind::Descriptor),
                ("web01.vmx", FileKind::Vmx),
            ]
        );
    }

    #[test]
    fn folders_with_subfolders_or_symlinks_are_trees_unless_they_hold_a_vmx() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        fs::write(d.join("disk.img"), b"x").unwrap();
        assert!(!is_tree(d, false).unwrap(), "flat folder of files");
        assert!(is_tree(d, true).unwrap(), "--tree");
        std::os::unix::fs::symlink("disk.img", d.join("link")).unwrap();
        assert!(is_tree(d, false).unwrap(), "a symlink");
        fs::remove_file(d.join("link")).unwrap();
        fs::create_dir(d.join("base")).unwrap();
        assert!(is_tree(d, false).unwrap(), "a subfolder");
        fs::write(d.join("web01.VMX"), b"x").unwrap();
        assert!(
            !is_tree(d, false).unwrap(),
            "a VM folder with a lock folder"
        );
        assert!(!is_tree(&d.join("disk.img"), false).unwrap());
        let err = is_tree(&d.join("disk.img"), true).unwrap_err();
        assert!(err.to_string().contains("only a folder"), "{err}");
    }

    #[test]
    fn missing_extent_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("web01.vmdk"), DESCRIPTOR).unwrap();
        fs::write(dir.path().join("web01.vmx"), "x").unwrap();
        let err = scan(dir.path()).unwrap_err();
        assert!(matches!(err, RepoError::MissingExtent { .. }), "{err}");
        assert!(err.to_string().contains("web01-flat.vmdk"));
    }

    #[test]
    fn missing_path_is_refused() {
        let err = scan(Path::new("/nonexistent/revive-test")).unwrap_err();
        assert!(
            err.to_string().contains("/nonexistent/revive-test"),
            "{err}"
        );
    }
}
