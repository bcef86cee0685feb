//! Kernel build steps shared by `host/build.rs` (embeds the PTX) and `cargo xtask build-kernels`
//! (also assembles with ptxas and prints a resource table).
//!
//! The kernels are compiled by rustc's own NVPTX backend:
//! `cargo rustc -Zbuild-std=core --target nvptx64-nvidia-cuda -- --emit=asm -C target-cpu=sm_90a`.
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;

pub const TARGET: &str = "nvptx64-nvidia-cuda";
pub const ARCH: &str = "sm_90a";
pub const KERNELS_CRATE: &str = "duo-attn-kernels";
/// Cargo profile of the kernel build (root Cargo.toml): one codegen unit, so one `.s` file.
pub const PROFILE: &str = "ptx";
const SETUP_HINT: &str = "run `scripts/setup.sh` (Debian 12) to install Debian's rustc-web/cargo-web/rust-web-src \
and the ptxas wheel; see README.md";

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("`{0}` could not be started: {1}. Is the Rust toolchain installed? {SETUP_HINT}")]
    ToolMissing(String, std::io::Error),
    #[error(
        "rustc `{rustc}` has no library source at {path} (needed by -Zbuild-std=core). {SETUP_HINT}"
    )]
    NoLibrarySource { rustc: String, path: PathBuf },
    #[error("rustc `{0}` does not list the {TARGET} target. {SETUP_HINT}")]
    NoNvptxTarget(String),
    #[error("the kernel build failed (exit {0}); cargo's messages are above")]
    CargoFailed(i32),
    #[error("the kernel build finished but no PTX was found under {0}")]
    NoPtx(PathBuf),
    #[error("ptxas `{path}` failed: {message}")]
    Ptxas { path: PathBuf, message: String },
    #[error("cuobjdump `{path}` failed: {message}")]
    Cuobjdump { path: PathBuf, message: String },
    #[error("i/o error on {0}: {1}")]
    Io(PathBuf, std::io::Error),
}

fn run_capture(cmd: &mut Command) -> Result<std::process::Output, BuildError> {
    let name = cmd.get_program().to_string_lossy().into_owned();
    cmd.output().map_err(|e| BuildError::ToolMissing(name, e))
}

/// Checks that `rustc` can build core for NVPTX: the target is known and the library source exists.
pub fn check_toolchain(rustc: &OsStr, cwd: &Path) -> Result<(), BuildError> {
    let name = rustc.to_string_lossy().into_owned();
    let out = run_capture(
        Command::new(rustc)
            .current_dir(cwd)
            .args(["--print", "target-list"]),
    )?;
    if !String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.trim() == TARGET)
    {
        return Err(BuildError::NoNvptxTarget(name));
    }
    let out = run_capture(
        Command::new(rustc)
            .current_dir(cwd)
            .args(["--print", "sysroot"]),
    )?;
    let sysroot = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    let src = sysroot.join("lib/rustlib/src/rust/library/core/Cargo.toml");
    if !src.exists() {
        return Err(BuildError::NoLibrarySource {
            rustc: name,
            path: src,
        });
    }
    Ok(())
}

/// Builds the kernels crate of the workspace at `workspace` to PTX for sm_90a, with its own
/// target directory `target_dir`, and returns the path of the PTX file.
///
/// Safe to call from a build script: the variables cargo sets for the outer build are removed,
/// so the nested build targets NVPTX with its own flags.
pub fn build_ptx(workspace: &Path, target_dir: &Path) -> Result<PathBuf, BuildError> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    check_toolchain(&rustc, workspace)?;

    let mut cmd = Command::new(&cargo);
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        let keep = matches!(
            key.as_ref(),
            "CARGO_HOME" | "CARGO_NET_OFFLINE" | "CARGO_TERM_COLOR"
        );
        let outer = key.starts_with("CARGO_")
            || matches!(
                key.as_ref(),
                "RUSTFLAGS"
                    | "RUSTDOCFLAGS"
                    | "RUSTC_WRAPPER"
                    | "RUSTC_WORKSPACE_WRAPPER"
                    | "TARGET"
                    | "HOST"
                    | "OUT_DIR"
                    | "OPT_LEVEL"
                    | "PROFILE"
                    | "DEBUG"
                    | "NUM_JOBS"
                    | "RUSTC_LINKER"
                    | "RUSTDOC"
            );
        if outer && !keep {
            cmd.env_remove(key.as_ref());
        }
    }
    cmd.current_dir(workspace)
        .env("RUSTC", &rustc)
        .env("RUSTC_BOOTSTRAP", "1") // -Zbuild-std and the kernels' #![feature]s on a stable toolchain
        .args([
            "rustc",
            "--package",
            KERNELS_CRATE,
            "--profile",
            PROFILE,
            "-Zbuild-std=core",
            "--target",
            TARGET,
        ])
        .arg("--target-dir")
        .arg(target_dir)
        .args(["--", "--emit=asm", "-C"])
        .arg(format!("target-cpu={ARCH}"))
        // Fragment arrays must stay in registers: unroll the fixed-trip tile loops completely.
        .args(["-C", "llvm-args=-unroll-threshold=20000"]);
    let status = cmd
        .status()
        .map_err(|e| BuildError::ToolMissing(cargo.to_string_lossy().into_owned(), e))?;
    if !status.success() {
        return Err(BuildError::CargoFailed(status.code().unwrap_or(-1)));
    }
    let asm = newest_ptx(&target_dir.join(TARGET).join(PROFILE).join("deps"))?;
    let text = std::fs::read_to_string(&asm).map_err(|e| BuildError::Io(asm.clone(), e))?;
    let ptx = target_dir.join("duo_attn_kernels.ptx");
    std::fs::write(&ptx, add_module_declarations(&text))
        .map_err(|e| BuildError::Io(ptx.clone(), e))?;
    Ok(ptx)
}

/// Module-scope declarations the kernels use by name from inline asm. `.extern .shared` (dynamic
/// shared memory) cannot be declared inside a function, which is all inline asm can reach.
pub const MODULE_DECLARATIONS: &str = ".extern .shared .align 1024 .b8 duo_dyn_smem[];";

/// Performance directives per kernel-entry prefix: rustc has no attribute for them. The
/// warp-specialised Hopper kernel needs a register cap at entry (`.maxntid` with
/// `.minnctapersm 1`) for `setmaxnreg`. The D = 64 decode entries keep two blocks per SM (their
/// shared memory allows it) by a cap of 128 registers: ptxas gave them 154-162 once the append
/// was fused in, for a few values in its path.
pub fn entry_directives() -> Vec<(&'static str, String)> {
    use duo_attn_kernels::abi::{DECODE_ENTRIES, WS_THREADS, decode_threads};
    let ws = format!(".maxntid {WS_THREADS}, 1, 1\n.minnctapersm 1");
    let decode_d64 = format!(".maxntid {}, 1, 1\n.minnctapersm 2", decode_threads(64));
    let mut directives: Vec<_> = DECODE_ENTRIES
        .iter()
        .filter(|&&(_, _, d)| d == 64)
        .map(|&(name, _, _)| (name, decode_d64.clone()))
        .collect();
    directives.push(("duo_prefill_wgmma_ws_", ws.clone()));
    directives.push((TENSOR_MAP_ENTRY_PREFIX, ws));
    directives
}

/// Entries whose by-value parameter holds TMA tensor maps, which must be 64-byte aligned in
/// parameter space; rustc's NVPTX ABI declares by-value parameters `.align 16` at most.
pub const TENSOR_MAP_ENTRY_PREFIX: &str = "duo_prefill_wgmma_tma_";

/// Inserts [`MODULE_DECLARATIONS`] after the PTX header (`.address_size`) and each entry's
/// [`entry_directives`] between its parameter list and its body, and raises the parameter
/// alignment of the [`TENSOR_MAP_ENTRY_PREFIX`] entries to 64.
pub fn add_module_declarations(ptx: &str) -> String {
    let directives = entry_directives();
    let mut out = String::with_capacity(ptx.len() + 4096);
    let mut inserted = false;
    let mut pending: Option<&str> = None; // directives of the entry whose parameters are being read
    let mut tensor_map_params = false; // reading the parameter list of a tensor-map entry
    for line in ptx.lines() {
        let trimmed = line.trim_start();
        if pending.is_some() && trimmed == "{" {
            out.push_str(pending.take().unwrap());
            out.push('\n');
        }
        if tensor_map_params && trimmed.starts_with(".param .align 16 .b8 ") {
            out.push_str(&line.replacen(".param .align 16 ", ".param .align 64 ", 1));
            out.push('\n');
            continue;
        }
        if trimmed == "{" {
            tensor_map_params = false;
        }
        out.push_str(line);
        out.push('\n');
        if !inserted && trimmed.starts_with(".address_size") {
            out.push_str(MODULE_DECLARATIONS);
            out.push('\n');
            inserted = true;
        }
        if let Some(name) = trimmed.strip_prefix(".visible .entry ") {
            tensor_map_params = name.starts_with(TENSOR_MAP_ENTRY_PREFIX);
            pending = directives
                .iter()
                .find(|(prefix, _)| name.starts_with(prefix))
                .map(|(_, d)| d.as_str());
        }
    }
    out
}

/// rustc names the asm `duo_attn_kernels-<hash>.s`; take the newest.
fn newest_ptx(deps: &Path) -> Result<PathBuf, BuildError> {
    let prefix = KERNELS_CRATE.replace('-', "_") + "-";
    let entries = std::fs::read_dir(deps).map_err(|e| BuildError::Io(deps.to_path_buf(), e))?;
    entries
        .filter_map(|e| e.ok())
        .filter(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            name.starts_with(&prefix) && name.ends_with(".s")
        })
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .max()
        .map(|(_, path)| path)
        .ok_or_else(|| BuildError::NoPtx(deps.to_path_buf()))
}

/// Where ptxas may be: `$PTXAS`, `PATH`, the CUDA toolkit, the wheel `scripts/setup.sh` installs.
pub fn find_ptxas() -> Option<PathBuf> {
    find_tool("PTXAS", "ptxas", "nvcc")
}

/// Where cuobjdump may be: `$CUOBJDUMP`, `PATH`, the CUDA toolkit, the wheels `scripts/setup.sh`
/// installs (with nvdisasm beside it, which `-sass` runs): the cubin's SASS, offline.
pub fn find_cuobjdump() -> Option<PathBuf> {
    find_tool("CUOBJDUMP", "cuobjdump", "cuobjdump")
}

/// CUDA tool `name`: `$env`, else the first of `PATH`, `/usr/local/cuda/bin` and the wheel
/// directory `<tools>/<wheel_dir>/nvidia/cu13/bin` that has it.
fn find_tool(env: &str, name: &str, wheel_dir: &str) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(env) {
        return Some(PathBuf::from(p));
    }
    let mut candidates: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join(name))
                .collect()
        })
        .unwrap_or_default();
    candidates.push(Path::new("/usr/local/cuda/bin").join(name));
    if let Some(tools) = tools_dir() {
        candidates.push(tools.join(wheel_dir).join("nvidia/cu13/bin").join(name));
    }
    candidates.into_iter().find(|p| p.is_file())
}

/// `$DUO_ATTN_TOOLS`, else `~/.cache/duo-attn`: where `scripts/setup.sh` puts the CUDA wheels.
fn tools_dir() -> Option<PathBuf> {
    std::env::var_os("DUO_ATTN_TOOLS")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache/duo-attn")))
}

/// Tensor-core instructions of one kernel entry in its SASS.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SassCounts {
    pub name: String,
    /// Warpgroup MMAs (`HGMMA.*`, from `wgmma.mma_async`).
    pub hgmma: u32,
    /// Warp MMAs (`HMMA.*`, from `mma.sync`).
    pub hmma: u32,
}

/// Counts the tensor-core instructions of every entry of `cubin` (`cuobjdump -sass`).
pub fn sass_counts(cuobjdump: &Path, cubin: &Path) -> Result<Vec<SassCounts>, BuildError> {
    let out = run_capture(Command::new(cuobjdump).arg("-sass").arg(cubin))?;
    if !out.status.success() {
        return Err(BuildError::Cuobjdump {
            path: cuobjdump.to_path_buf(),
            message: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    Ok(parse_sass_counts(&String::from_utf8_lossy(&out.stdout)))
}

/// Parses `cuobjdump -sass`: a "Function : name" line opens each entry; each instruction line is
/// `/*addr*/ [@predicate] OPCODE.modifiers operands ;`.
pub fn parse_sass_counts(text: &str) -> Vec<SassCounts> {
    let mut kernels: Vec<SassCounts> = Vec::new();
    for line in text.lines() {
        if let Some(name) = line.split("Function : ").nth(1) {
            kernels.push(SassCounts {
                name: name.trim().to_string(),
                ..Default::default()
            });
            continue;
        }
        let (Some(k), Some(code)) = (kernels.last_mut(), line.split("*/").nth(1)) else {
            continue;
        };
        let mut words = code.split_whitespace();
        let opcode = match words.next() {
            Some(w) if w.starts_with('@') => words.next(),
            w => w,
        };
        let base = opcode
            .unwrap_or_default()
            .split('.')
            .next()
            .unwrap_or_default();
        match base {
            "HGMMA" => k.hgmma += 1,
            "HMMA" => k.hmma += 1,
            _ => {}
        }
    }
    kernels
}

/// A plain text table of the SASS counts (entries with tensor-core instructions).
pub fn format_sass_counts(kernels: &[SassCounts]) -> String {
    kernels
        .iter()
        .filter(|k| k.hgmma + k.hmma > 0)
        .map(|k| format!("{:<40} HGMMA {:>4}  HMMA {:>4}\n", k.name, k.hgmma, k.hmma))
        .collect()
}

/// ptxas's resource report for one kernel entry.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelResources {
    pub name: String,
    pub registers: u32,
    pub shared_bytes: u32,
    pub stack_bytes: u32,
    pub spill_store_bytes: u32,
    pub spill_load_bytes: u32,
    /// ptxas serialized this kernel's warpgroup MMAs (info C7520: each wgmma waits for the
    /// previous one), which costs a Hopper kernel about a third of its speed.
    pub wgmma_serialized: bool,
}

/// Assembles `ptx` for sm_90a into `cubin` and returns the per-kernel resource report.
pub fn assemble(
    ptxas: &Path,
    ptx: &Path,
    cubin: &Path,
) -> Result<Vec<KernelResources>, BuildError> {
    let out = run_capture(
        Command::new(ptxas)
            .arg(format!("-arch={ARCH}"))
            .arg("-v")
            .arg(ptx)
            .arg("-o")
            .arg(cubin),
    )?;
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(BuildError::Ptxas {
            path: ptxas.to_path_buf(),
            message: text,
        });
    }
    Ok(parse_ptxas_report(&text))
}

fn number_before(line: &str, unit: &str) -> Option<u32> {
    let idx = line.find(unit)?;
    line[..idx].split_whitespace().last()?.parse().ok()
}

/// Parses `ptxas -v` output ("Compiling entry function 'x'", "N bytes stack frame, N bytes spill
/// stores, N bytes spill loads", "Used N registers, ..., N bytes smem").
pub fn parse_ptxas_report(text: &str) -> Vec<KernelResources> {
    let mut kernels: Vec<KernelResources> = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let name = rest.split('\'').next().unwrap_or_default().to_string();
            // A serialization note may have named it already: keep that entry, now last.
            let entry = match kernels.iter().position(|k| k.name == name) {
                Some(i) => kernels.remove(i),
                None => KernelResources {
                    name,
                    ..Default::default()
                },
            };
            kernels.push(entry);
        } else if line.contains("wgmma.mma_async instructions are serialized") {
            // Reported per function, not always right after its "Compiling entry" line.
            let name = line
                .split("function '")
                .nth(1)
                .and_then(|r| r.split('\'').next());
            if let Some(k) = kernels.iter_mut().find(|k| Some(k.name.as_str()) == name) {
                k.wgmma_serialized = true;
            } else if let Some(name) = name {
                kernels.push(KernelResources {
                    name: name.to_string(),
                    wgmma_serialized: true,
                    ..Default::default()
                });
            }
        } else if let Some(k) = kernels.last_mut() {
            if line.contains("stack frame") {
                k.stack_bytes = number_before(line, "bytes stack frame").unwrap_or(0);
                k.spill_store_bytes = number_before(line, "bytes spill stores").unwrap_or(0);
                k.spill_load_bytes = number_before(line, "bytes spill loads").unwrap_or(0);
            } else if line.contains("Used") && line.contains("registers") {
                k.registers = number_before(line, "registers").unwrap_or(0);
                k.shared_bytes = number_before(line, "bytes smem").unwrap_or(0);
            }
        }
    }
    kernels
}

/// A plain text table of the report.
pub fn format_report(kernels: &[KernelResources]) -> String {
    let mut s = format!(
        "{:<32} {:>9} {:>11} {:>11} {:>12} {:>11}\n",
        "kernel", "registers", "smem bytes", "stack bytes", "spill stores", "spill loads"
    );
    for k in kernels {
        s += &format!(
            "{:<32} {:>9} {:>11} {:>11} {:>12} {:>11}\n",
            k.name,
            k.registers,
            k.shared_bytes,
            k.stack_bytes,
            k.spill_store_bytes,
            k.spill_load_bytes
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn declarations_go_after_the_header_and_directives_before_bodies() {
        let ptx = ".version 8.0\n.address_size 64\n.visible .entry k(\n.param .b64 p\n)\n{\nret;\n}\n\
.visible .entry duo_prefill_wgmma_ws_bf16_d64(\n.param .b64 p\n)\n{\nret;\n}\n";
        let threads = duo_attn_kernels::abi::WS_THREADS;
        let want = format!(
            ".version 8.0\n.address_size 64\n{MODULE_DECLARATIONS}\n.visible .entry k(\n.param .b64 p\n)\n{{\nret;\n}}\n\
.visible .entry duo_prefill_wgmma_ws_bf16_d64(\n.param .b64 p\n)\n.maxntid {threads}, 1, 1\n.minnctapersm 1\n{{\nret;\n}}\n"
        );
        assert_eq!(add_module_declarations(ptx), want);
    }

    #[test]
    fn tensor_map_entries_get_64_byte_aligned_parameters() {
        let ptx = ".visible .entry duo_prefill_wgmma_tma_bf16_d64(\n\t.param .align 16 .b8 p[960]\n)\n{\nret;\n}\n\
.visible .entry other(\n\t.param .align 16 .b8 q[16]\n)\n{\nret;\n}\n";
        let out = add_module_declarations(ptx);
        assert!(out.contains("\t.param .align 64 .b8 p[960]"), "{out}");
        assert!(out.contains("\t.param .align 16 .b8 q[16]"), "{out}");
    }

    #[test]
    fn notes_serialized_wgmma_in_either_order() {
        let text = "ptxas info    : (C7520) Potential Performance Loss: wgmma.mma_async instructions are serialized due to program dependence on compiler-inserted WG.AR in divergent path in the function 'b'\n\
ptxas info    : Compiling entry function 'a' for 'sm_90a'\n\
ptxas info    : Compiling entry function 'b' for 'sm_90a'\n\
ptxas info    : Used 168 registers, used 1 barriers\n\
ptxas info    : (C7520) Potential Performance Loss: wgmma.mma_async instructions are serialized due to x in the function 'a'\n";
        let k = parse_ptxas_report(text);
        assert_eq!(k.len(), 2);
        assert!(k.iter().all(|k| k.wgmma_serialized));
        assert_eq!((k[1].name.as_str(), k[1].registers), ("b", 168));
    }

    #[test]
    fn counts_tensor_core_instructions_per_function() {
        let sass = "\tcode for sm_90a\n\t\tFunction : k_one\n\
        /*0010*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], RZ, !UPT ;  /* 0x0 */\n\
        /*0020*/              @P0 HGMMA.64x48x16.F32.BF16 R24, R8, gdesc[UR8], R24 ;  /* 0x0 */\n\
        /*0030*/                   STL [R1], R2 ;  /* 0x0 */\n\
\t\tFunction : k_two\n\
        /*0010*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;  /* 0x0 */\n";
        let counts = parse_sass_counts(sass);
        assert_eq!(
            counts,
            vec![
                SassCounts {
                    name: "k_one".into(),
                    hgmma: 2,
                    hmma: 0
                },
                SassCounts {
                    name: "k_two".into(),
                    hgmma: 0,
                    hmma: 1
                },
            ]
        );
    }

    #[test]
    fn parses_ptxas_verbose_output() {
        let text = "ptxas info    : 0 bytes gmem\n\
ptxas info    : Compiling entry function 'duo_prefill_f16_d64' for 'sm_90a'\n\
ptxas info    : Function properties for duo_prefill_f16_d64\n\
    32 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads\n\
ptxas info    : Used 168 registers, used 1 barriers, 18432 bytes smem\n";
        let k = parse_ptxas_report(text);
        assert_eq!(
            k,
            vec![KernelResources {
                name: "duo_prefill_f16_d64".into(),
                registers: 168,
                shared_bytes: 18432,
                stack_bytes: 32,
                spill_store_bytes: 8,
                spill_load_bytes: 4,
                wgmma_serialized: false,
            }]
        );
    }
}
