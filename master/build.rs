//! Links the demo binary with its relative relocations packed (DT_RELR,
//! `-z pack-relative-relocs`) where the toolchain and the C library can.
//!
//! Why: the master is the one process that keeps the pages ld.so reads at
//! its exec. Unpacked, the binary's relocation table is 67 kB (about 2,800
//! entries of 24 bytes), read once before the first fork and then held by
//! the master alone; packed, 4.3 kB remain (3.5 kB of other relocations,
//! 0.8 kB of packed relative ones). Measured with 8 workers
//! (bench/notes.md, "Memory"): the master's private memory about 50 kB
//! less, its PSS about 100 kB less, and the file 64 kB smaller.
//!
//! A binary so linked runs only on glibc 2.36 or later, so the flag is given
//! only when a program linked with it here, by this rustc with the flags and
//! the linker cargo gives it, runs here. When it cannot be tried (a cross
//! build) or fails, the binary is linked as before; nothing else changes.
//! `RESPAWN_RELR=0` turns it off. Only this package's binaries get the flag:
//! a program that embeds the library links as it chooses.

use std::env;
use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const FLAG: &str = "-Wl,-z,pack-relative-relocs";

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=RESPAWN_RELR");
    if env::var_os("RESPAWN_RELR").is_some_and(|v| v == "0") {
        return;
    }
    let (Some(out), Some(rustc)) = (env::var_os("OUT_DIR"), env::var_os("RUSTC")) else {
        return;
    };
    // A probe built for another target cannot be run here to prove itself.
    let target = env::var("TARGET").unwrap_or_default();
    if target != env::var("HOST").unwrap_or_default() || !target.ends_with("-linux-gnu") {
        return;
    }
    if links_and_runs(&PathBuf::from(out), &rustc, &target) {
        println!("cargo:rustc-link-arg-bins={FLAG}");
    }
}

/// Builds a small program with the flag, the way cargo builds the binary,
/// and runs it: only a glibc that knows DT_RELR loads it.
fn links_and_runs(out: &Path, rustc: &OsString, target: &str) -> bool {
    let source = out.join("relr_probe.rs");
    let program = out.join("relr_probe");
    // A vector of string slices: the program has pointers to relocate.
    let text = "fn main() { let v = vec![\"relr\"]; std::process::exit(i32::from(v[0].len() != 4)) }\n";
    if fs::write(&source, text).is_err() {
        return false;
    }
    let mut build = Command::new(rustc);
    // The flags cargo gives rustc: a linker chosen in .cargo/config.toml,
    // `make static`'s crt-static, anything the user set in RUSTFLAGS.
    if let Ok(flags) = env::var("CARGO_ENCODED_RUSTFLAGS") {
        build.args(flags.split('\x1f').filter(|f| !f.is_empty()));
    }
    if let Some(linker) = env::var_os("RUSTC_LINKER") {
        build.arg("-C").arg({
            let mut arg = OsString::from("linker=");
            arg.push(linker);
            arg
        });
    }
    build
        .args(["--edition=2021", "--crate-type=bin", "--target", target])
        .args(["-C", &format!("link-arg={FLAG}"), "-o"])
        .arg(&program)
        .arg(&source);
    let quiet = |command: &mut Command| {
        command
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|status| status.success())
    };
    quiet(&mut build) && quiet(&mut Command::new(&program))
}
