//! The static shared memory of each kernel, read from the module's assembly.
//!
//! The rule (what `emu_kernel_info` reports as a kernel's static shared bytes, and what is held
//! against the 48 KiB an H100 allows): the sum of the sizes (`.size`, no padding between them)
//! of the distinct `__shared__` variables that the kernel's code reaches in the compiled
//! module: the kernel's own function and, transitively, every function or data object its code
//! names (calls, including of non-inlined device functions and template instantiations, each
//! instantiation with its own variables). Variables are known as the symbols defined in the
//! `emu_shared` section (non-template, non-inline code) or named by the marker statements that
//! the rewrite adds after each function-scope `__shared__` declaration (see
//! `rewrite::SHARED_MARKER`; they also cover statics of templates and inline functions, whose
//! section attribute the compiler drops because they are COMDAT: this pass moves those into
//! `emu_shared`, so that the runtime poisons them at each block's start as well). A variable
//! declared but optimised away, as ptxas would drop it, is not counted unless its declaration's
//! marker survives: a declaration in code the kernel reaches counts, even in a branch never
//! taken, as on the GPU.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;

use super::rewrite::SHARED_MARKER;

/// The static shared memory a kernel may declare on sm_90 (ptxas refuses more).
pub const STATIC_LIMIT: u64 = 48 * 1024;

/// The result of [`analyse`].
pub struct Analysis {
    /// The assembly, with COMDAT shared variables moved into `emu_shared` and the table
    /// `__emu_kernel_shared` (one `u64` per kernel, `u64::MAX` when unknown) appended.
    pub text: String,
    /// Each kernel's static shared bytes, `None` when its code was not found.
    pub per_kernel: Vec<Option<u64>>,
}

fn is_sym_start(c: u8) -> bool {
    c == b'_' || c == b'.' || c == b'$' || c.is_ascii_alphabetic()
}
fn is_sym(c: u8) -> bool {
    is_sym_start(c) || c.is_ascii_digit()
}

/// The symbol-like words of an assembly line (string literals and registers left out).
fn words(line: &str) -> impl Iterator<Item = &str> {
    let b = line.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c == b'"' {
            i += 1;
            while i < b.len() && b[i] != b'"' {
                i += if b[i] == b'\\' { 2 } else { 1 };
            }
            i += 1;
        } else if is_sym_start(c) && (i == 0 || !matches!(b[i - 1], b'%' | b'\\')) {
            let s = i;
            while i < b.len() && is_sym(b[i]) {
                i += 1;
            }
            out.push(&line[s..i]);
        } else if c.is_ascii_digit() || c == b'%' {
            // Numbers (`8+sym`, `1b`) and registers.
            i += 1;
            while i < b.len() && is_sym(b[i]) {
                i += 1;
            }
        } else {
            i += 1;
        }
    }
    out.into_iter()
}

/// The section a `.section` / `.pushsection` directive's operands name.
fn section_name(ops: &str) -> String {
    let ops = ops.trim();
    if let Some(q) = ops.strip_prefix('"') {
        return q.split('"').next().unwrap_or("").to_string();
    }
    ops.split([',', ' ', '\t']).next().unwrap_or("").to_string()
}

struct Region<'a> {
    refs: Vec<&'a str>,
}

fn new_region(regions: &mut Vec<Region<'_>>) -> usize {
    regions.push(Region { refs: Vec::new() });
    regions.len() - 1
}

fn switch(to: String, section: &mut String, previous: &mut String) {
    *previous = std::mem::replace(section, to);
}

/// A definition to move into `emu_shared`: its lines, and the alignment directive before it.
struct Moved {
    lines: std::ops::Range<usize>,
    align: Option<String>,
    comm: Option<(String, u64, u64)>,
}

/// Reads the assembly `asm` of a module whose kernels are `kernels` (their `extern "C"`
/// names are their labels).
pub fn analyse(asm: &str, kernels: &[String]) -> Analysis {
    let lines: Vec<&str> = asm.lines().collect();
    let mut regions: Vec<Region<'_>> = Vec::new();
    let mut region_of: HashMap<&str, usize> = HashMap::new();
    // The region each section is in (a function's code resumes after a jump table).
    let mut cur: HashMap<String, Option<usize>> = HashMap::new();
    let mut section = String::from(".text");
    let mut previous = section.clone();
    let mut stack: Vec<String> = Vec::new();
    let mut sizes: HashMap<&str, u64> = HashMap::new();
    let mut in_shared_section: HashSet<&str> = HashSet::new();
    let mut marked: HashSet<&str> = HashSet::new();
    let mut defs: HashMap<&str, Moved> = HashMap::new();
    let mut last_align: Option<String> = None;
    let mut shared_declared = false;
    let mut idx = 0;
    while idx < lines.len() {
        let raw = lines[idx];
        let line = raw.trim();
        let here = idx;
        idx += 1;
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix(SHARED_MARKER) {
            let r = cur.get(&section).copied().flatten();
            for w in words(rest) {
                marked.insert(w);
                if let Some(r) = r {
                    regions[r].refs.push(w);
                }
            }
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let (word, ops) = match line.find([' ', '\t']) {
            Some(p) => (&line[..p], line[p..].trim()),
            None => (line, ""),
        };
        // A label.
        if let Some(name) = word.strip_suffix(':') {
            if ops.is_empty() && !name.is_empty() && !name.starts_with(".L") {
                let r = new_region(&mut regions);
                region_of.insert(name, r);
                cur.insert(section.clone(), Some(r));
                if section == "emu_shared" {
                    in_shared_section.insert(name);
                } else {
                    // Its data: the lines up to the next that is not a data directive.
                    let mut end = idx;
                    while end < lines.len() {
                        let d = lines[end].trim_start();
                        if [".zero", ".space", ".skip"]
                            .iter()
                            .any(|p| d.starts_with(p))
                        {
                            end += 1;
                        } else {
                            break;
                        }
                    }
                    defs.insert(
                        name,
                        Moved {
                            lines: here..end,
                            align: last_align.clone(),
                            comm: None,
                        },
                    );
                }
                last_align = None;
                continue;
            }
        }
        match word {
            ".section" | ".pushsection" => {
                let to = section_name(ops);
                if to == "emu_shared" {
                    shared_declared = true;
                }
                if word == ".pushsection" {
                    stack.push(section.clone());
                }
                switch(to, &mut section, &mut previous);
                last_align = None;
            }
            ".text" | ".data" | ".bss" => {
                switch(word.to_string(), &mut section, &mut previous);
                last_align = None;
            }
            ".previous" => {
                let p = previous.clone();
                switch(p, &mut section, &mut previous);
                last_align = None;
            }
            ".popsection" => {
                if let Some(p) = stack.pop() {
                    switch(p, &mut section, &mut previous);
                }
                last_align = None;
            }
            ".align" | ".p2align" | ".balign" => last_align = Some(raw.to_string()),
            ".size" => {
                let mut it = ops.splitn(2, ',');
                if let (Some(n), Some(v)) = (it.next(), it.next()) {
                    if let Ok(v) = v.trim().parse::<u64>() {
                        sizes.insert(n.trim(), v);
                    }
                }
            }
            ".comm" | ".lcomm" => {
                let f: Vec<&str> = ops.split(',').map(str::trim).collect();
                if let (Some(&n), Some(Ok(size))) = (f.first(), f.get(1).map(|v| v.parse())) {
                    let align = f.get(2).and_then(|a| a.parse().ok()).unwrap_or(1);
                    sizes.insert(n, size);
                    let r = new_region(&mut regions);
                    region_of.insert(n, r);
                    defs.insert(
                        n,
                        Moved {
                            lines: here..here + 1,
                            align: None,
                            comm: Some((n.to_string(), size, align)),
                        },
                    );
                }
            }
            ".set" | ".equ" | ".equiv" => {
                let mut w = words(ops);
                if let Some(a) = w.next() {
                    let r = match region_of.get(a) {
                        Some(&r) => r,
                        None => {
                            let r = new_region(&mut regions);
                            region_of.insert(a, r);
                            r
                        }
                    };
                    regions[r].refs.extend(w);
                }
            }
            ".type" | ".globl" | ".global" | ".weak" | ".hidden" | ".local" | ".file" | ".loc"
            | ".ident" | ".protected" | ".internal" => {}
            _ if word.starts_with(".cfi_") => {}
            _ => {
                if let Some(r) = cur.get(&section).copied().flatten() {
                    regions[r].refs.extend(words(line));
                }
            }
        }
    }

    // The shared variables, and those to move into emu_shared.
    let mut shared: HashSet<&str> = in_shared_section.clone();
    let mut moves: Vec<&Moved> = Vec::new();
    for &m in &marked {
        if in_shared_section.contains(m) {
            continue;
        }
        if let Some(d) = defs.get(m) {
            shared.insert(m);
            moves.push(d);
        }
    }
    moves.sort_by_key(|d| d.lines.start);

    // Each kernel's reach. The registration is not followed (it names every kernel); a
    // kernel naming another is an alias or thunk the compiler made of identical code.
    let stop = |w: &str| {
        [
            "__emu_kernel_table",
            "__emu_entry_",
            "__emu_kernels",
            "__emu_name",
        ]
        .iter()
        .any(|s| w.contains(s))
    };
    let reach: Vec<Option<(u64, Vec<String>)>> = kernels
        .iter()
        .map(|k| {
            let &start = region_of.get(k.as_str())?;
            let mut seen = vec![false; regions.len()];
            let mut counted: HashSet<&str> = HashSet::new();
            let mut todo = vec![start];
            seen[start] = true;
            let mut total = 0u64;
            while let Some(r) = todo.pop() {
                for &w in &regions[r].refs {
                    if shared.contains(w) && counted.insert(w) {
                        total += sizes.get(w).copied().unwrap_or(0);
                    }
                    if stop(w) {
                        continue;
                    }
                    if let Some(&n) = region_of.get(w) {
                        if !seen[n] {
                            seen[n] = true;
                            todo.push(n);
                        }
                    }
                }
            }
            let mut vars: Vec<String> = counted.into_iter().map(str::to_string).collect();
            vars.sort();
            Some((total, vars))
        })
        .collect();
    let per_kernel: Vec<Option<u64>> = reach.iter().map(|r| r.as_ref().map(|r| r.0)).collect();

    // The text: moved definitions cut out, then appended in emu_shared, then the table.
    let mut text = String::with_capacity(asm.len() + 4096);
    let mut cut = moves.iter().map(|d| d.lines.clone()).peekable();
    let mut i = 0;
    while i < lines.len() {
        if let Some(r) = cut.peek() {
            if r.start == i {
                i = r.end.max(i + 1);
                cut.next();
                continue;
            }
        }
        text.push_str(lines[i]);
        text.push('\n');
        i += 1;
    }
    if !moves.is_empty() {
        text.push_str(if shared_declared {
            "\t.section\temu_shared\n"
        } else {
            "\t.section\temu_shared,\"aw\"\n"
        });
        for d in &moves {
            match &d.comm {
                Some((n, size, align)) => {
                    let _ = writeln!(
                        text,
                        "\t.balign {align}\n\t.size\t{n}, {size}\n{n}:\n\t.zero {size}"
                    );
                }
                None => {
                    if let Some(a) = &d.align {
                        text.push_str(a);
                        text.push('\n');
                    }
                    for l in &lines[d.lines.clone()] {
                        text.push_str(l);
                        text.push('\n');
                    }
                }
            }
        }
    }
    text.push_str("\t.section\t.rodata\n\t.balign 8\n\t.globl\t__emu_kernel_shared\n\t.hidden\t__emu_kernel_shared\n__emu_kernel_shared:\n");
    for v in &per_kernel {
        let _ = writeln!(text, "\t.quad\t{}", v.unwrap_or(u64::MAX));
    }
    text.push_str("\t.quad\t0\n");
    // __emu_kernel_shared_vars: per kernel, a list of {address, size} ended by {0, 0}.
    text.push_str("\t.section\t.data.rel.ro.local,\"aw\"\n\t.balign 8\n\t.globl\t__emu_kernel_shared_vars\n\t.hidden\t__emu_kernel_shared_vars\n__emu_kernel_shared_vars:\n");
    for (i, r) in reach.iter().enumerate() {
        match r {
            Some(_) => {
                let _ = writeln!(text, "\t.quad\t.Lemu_shared_vars{i}");
            }
            None => text.push_str("\t.quad\t0\n"),
        }
    }
    text.push_str("\t.quad\t0\n");
    for (i, r) in reach.iter().enumerate() {
        if let Some((_, vars)) = r {
            let _ = writeln!(text, ".Lemu_shared_vars{i}:");
            for v in vars {
                let size = sizes.get(v.as_str()).copied().unwrap_or(0);
                let _ = writeln!(text, "\t.quad\t{v}\n\t.quad\t{size}");
            }
            text.push_str("\t.quad\t0\n\t.quad\t0\n");
        }
    }
    Analysis { text, per_kernel }
}

/// ptxas' refusal of the kernels over [`STATIC_LIMIT`], in its log form; empty when none.
pub fn over_limit(kernels: &[String], per_kernel: &[Option<u64>]) -> String {
    let mut log = String::new();
    for (k, v) in kernels.iter().zip(per_kernel) {
        if let Some(v) = *v {
            if v > STATIC_LIMIT {
                let _ = writeln!(
                    log,
                    "ptxas error   : Entry function '{k}' uses too much shared data (0x{v:x} bytes, 0x{STATIC_LIMIT:x} max)"
                );
            }
        }
    }
    log
}
