//! Sample VM folders as ESXi lays them out, with disks of mixed data.

use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

/// A VM folder on disk: `<name>.vmx`, `<name>.vmdk`, `<name>-flat.vmdk`, `<name>.nvram`, `vmware.log`.
pub struct SampleVm {
    /// The folder.
    pub dir: PathBuf,
    /// VM name.
    pub name: String,
    /// Size of the flat disk.
    pub disk_size: u64,
}

impl SampleVm {
    /// Creates a VM folder `parent/name` whose flat disk holds `disk_size` bytes of
    /// mixed data: random runs, zero runs, repeated blocks and compressible text,
    /// in runs of 64 KiB to 2 MiB so that some chunks are holes and some repeat.
    pub fn create(parent: &Path, name: &str, disk_size: u64, seed: u64) -> SampleVm {
        let dir = parent.join(name);
        fs::create_dir_all(&dir).expect("create vm folder");
        let mut rng = StdRng::seed_from_u64(seed);
        let flat = dir.join(format!("{name}-flat.vmdk"));
        let mut out = BufWriter::with_capacity(1 << 20, File::create(&flat).expect("create flat"));
        let mut repeated = vec![0u8; 1 << 20];
        rng.fill_bytes(&mut repeated);
        let text: Vec<u8> = b"GET /index.html HTTP/1.1 200 revive instant recovery log line\n"
            .iter()
            .cycle()
            .take(1 << 20)
            .copied()
            .collect();
        let mut random = vec![0u8; 2 << 20];
        let mut written = 0u64;
        while written < disk_size {
            let run = ((rng.random_range(1..=32u64)) * 65536).min(disk_size - written) as usize;
            match rng.random_range(0..10) {
                0..=3 => {
                    rng.fill_bytes(&mut random[..run]);
                    out.write_all(&random[..run]).expect("write");
                }
                4..=6 => out.write_all(&vec![0u8; run]).expect("write"),
                7..=8 => write_cycled(&mut out, &repeated, run),
                _ => write_cycled(&mut out, &text, run),
            }
            written += run as u64;
        }
        out.flush().expect("flush");
        drop(out);
        let sectors = disk_size / 512;
        fs::write(
            dir.join(format!("{name}.vmdk")),
            format!(
                "# Disk DescriptorFile\nversion=1\nencoding=\"UTF-8\"\nCID=fffffffe\nparentCID=ffffffff\n\
                 createType=\"vmfs\"\n\n# Extent description\nRW {sectors} VMFS \"{name}-flat.vmdk\"\n\n\
                 # The Disk Data Base\nddb.adapterType = \"lsilogic\"\nddb.virtualHWVersion = \"14\"\n"
            ),
        )
        .expect("write descriptor");
        fs::write(
            dir.join(format!("{name}.vmx")),
            format!(
                ".encoding = \"UTF-8\"\nconfig.version = \"8\"\nvirtualHW.version = \"14\"\n\
                 displayName = \"{name}\"\nmemSize = \"512\"\nnumvcpus = \"1\"\nguestOS = \"otherlinux-64\"\n\
                 scsi0.present = \"TRUE\"\nscsi0.virtualDev = \"lsilogic\"\nscsi0:0.present = \"TRUE\"\n\
                 scsi0:0.fileName = \"{name}.vmdk\"\nnvram = \"{name}.nvram\"\n"
            ),
        )
        .expect("write vmx");
        let mut nvram = vec![0u8; 8684];
        rng.fill_bytes(&mut nvram);
        fs::write(dir.join(format!("{name}.nvram")), nvram).expect("write nvram");
        fs::write(
            dir.join("vmware.log"),
            "2026-11-23T00:00:00.000Z| vmx| I005: Log for VMware ESX\n",
        )
        .expect("write log");
        SampleVm {
            dir,
            name: name.to_string(),
            disk_size,
        }
    }

    /// Path of the flat disk.
    pub fn flat(&self) -> PathBuf {
        self.dir.join(format!("{}-flat.vmdk", self.name))
    }

    /// Overwrites `count` distinct blocks of `block` bytes (at block-aligned
    /// offsets) with fresh random bytes; returns the block numbers.
    pub fn change_blocks(&self, block: u64, count: usize, seed: u64) -> Vec<u64> {
        let mut rng = StdRng::seed_from_u64(seed);
        let blocks = self.disk_size / block;
        let mut chosen: Vec<u64> = Vec::new();
        while chosen.len() < count {
            let b = rng.random_range(0..blocks);
            if !chosen.contains(&b) {
                chosen.push(b);
            }
        }
        let f = OpenOptions::new()
            .write(true)
            .open(self.flat())
            .expect("open flat");
        let mut data = vec![0u8; block as usize];
        for b in &chosen {
            rng.fill_bytes(&mut data);
            f.write_all_at(&data, b * block).expect("write block");
        }
        chosen
    }
}

/// Writes `len` bytes taken from the start of `pattern`, repeated as needed.
fn write_cycled(out: &mut impl Write, pattern: &[u8], len: usize) {
    let mut left = len;
    while left > 0 {
        let n = left.min(pattern.len());
        out.write_all(&pattern[..n]).expect("write");
        left -= n;
    }
}
