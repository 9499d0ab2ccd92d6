//! The rewrite of the preprocessed source: marker tokens, inline `asm`, registration.
//!
//! Every edit replaces a byte range with text on one line followed by as many newlines as the
//! range held, so the preprocessor's line markers stay true and diagnostics keep pointing at
//! the source's own lines.

use std::fmt::Write as _;

/// A kernel found in the source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Kernel {
    /// The `extern "C"` name.
    pub name: String,
    /// The first argument of `__launch_bounds__`, as source text, if any.
    pub max_threads: Option<String>,
}

/// The rewritten text and the kernels it defines.
pub struct Rewritten {
    /// The preprocessed unit, rewritten, same line count.
    pub text: String,
    /// `extern "C"` kernel definitions, in source order.
    pub kernels: Vec<Kernel>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Ident,
    Str,
    Char,
    Num,
    Punct,
}

#[derive(Clone, Copy, Debug)]
struct Tok {
    kind: Kind,
    start: usize,
    end: usize,
    /// In the user's code (not a system header, not the runtime).
    user: bool,
    line: u32,
}

struct Lexed<'a> {
    src: &'a str,
    toks: Vec<Tok>,
    /// The file name of each token's line (index into names).
    files: Vec<String>,
    file_of: Vec<usize>,
}

fn is_ident_start(c: u8) -> bool {
    c == b'_' || c.is_ascii_alphabetic()
}
fn is_ident(c: u8) -> bool {
    c == b'_' || c.is_ascii_alphanumeric()
}

fn lex(src: &str) -> Lexed<'_> {
    let b = src.as_bytes();
    let mut toks = Vec::new();
    let mut files: Vec<String> = vec![String::new()];
    let mut file_of = Vec::new();
    let mut cur_file = 0usize;
    let mut user = true;
    let mut line: u32 = 1;
    let mut i = 0;
    let mut at_line_start = true;
    while i < b.len() {
        let c = b[i];
        if c == b'\n' {
            line = line.saturating_add(1);
            at_line_start = true;
            i += 1;
            continue;
        }
        if c == b' ' || c == b'\t' || c == b'\r' || c == b'\x0c' || c == b'\x0b' {
            i += 1;
            continue;
        }
        if at_line_start && c == b'#' {
            // A line marker `# N "file" flags` (or a #pragma kept by the preprocessor).
            let end = src[i..].find('\n').map(|e| i + e).unwrap_or(b.len());
            let l = &src[i + 1..end];
            let mut parts = l.split_whitespace();
            if let Some(n) = parts.next().and_then(|n| n.parse::<u32>().ok()) {
                if let (Some(q1), Some(q2)) = (l.find('"'), l.rfind('"')) {
                    if q2 > q1 {
                        let name = l[q1 + 1..q2].to_string();
                        let flags: Vec<&str> = l[q2 + 1..].split_whitespace().collect();
                        let system = flags.contains(&"3");
                        let runtime =
                            name.ends_with("emu_runtime.h") || name.ends_with("emu_ptx.h");
                        user = !system && !runtime && !name.starts_with('<');
                        cur_file = match files.iter().position(|f| *f == name) {
                            Some(p) => p,
                            None => {
                                files.push(name);
                                files.len() - 1
                            }
                        };
                    }
                }
                // The next line is line n: the marker's own newline is consumed here, not
                // counted (`# 0 "<built-in>"` names line 0, so `n - 1` cannot be formed).
                line = n;
                at_line_start = true;
                i = (end + 1).min(b.len());
                continue;
            }
            i = end;
            continue;
        }
        at_line_start = false;
        let start = i;
        let kind;
        if is_ident_start(c) {
            while i < b.len() && is_ident(b[i]) {
                i += 1;
            }
            // Encoding prefixes and raw strings: u8"..", L"..", R"d(..)d", u8R"..".
            let word = &src[start..i];
            if i < b.len()
                && b[i] == b'"'
                && matches!(
                    word,
                    "u8" | "u" | "U" | "L" | "R" | "u8R" | "uR" | "UR" | "LR"
                )
            {
                if word.ends_with('R') {
                    let open = src[i + 1..].find('(').map(|p| i + 1 + p).unwrap_or(b.len());
                    let delim = format!("){}\"", &src[i + 1..open]);
                    let close = src[open..]
                        .find(&delim)
                        .map(|p| open + p + delim.len())
                        .unwrap_or(b.len());
                    line = line.saturating_add(src[i..close].matches('\n').count() as u32);
                    i = close;
                } else {
                    i = skip_quoted(b, i, b'"');
                }
                kind = Kind::Str;
            } else if i < b.len() && b[i] == b'\'' && matches!(word, "u8" | "u" | "U" | "L") {
                i = skip_quoted(b, i, b'\'');
                kind = Kind::Char;
            } else {
                kind = Kind::Ident;
            }
        } else if c.is_ascii_digit() || (c == b'.' && i + 1 < b.len() && b[i + 1].is_ascii_digit())
        {
            while i < b.len() {
                let d = b[i];
                let exponent_sign =
                    (d == b'+' || d == b'-') && matches!(b[i - 1], b'e' | b'E' | b'p' | b'P');
                if is_ident(d) || d == b'.' || d == b'\'' || exponent_sign {
                    i += 1;
                } else {
                    break;
                }
            }
            kind = Kind::Num;
        } else if c == b'"' {
            i = skip_quoted(b, i, b'"');
            kind = Kind::Str;
        } else if c == b'\'' {
            i = skip_quoted(b, i, b'\'');
            kind = Kind::Char;
        } else {
            i += 1;
            kind = Kind::Punct;
        }
        toks.push(Tok {
            kind,
            start,
            end: i,
            user,
            line,
        });
        file_of.push(cur_file);
    }
    Lexed {
        src,
        toks,
        files,
        file_of,
    }
}

fn skip_quoted(b: &[u8], mut i: usize, q: u8) -> usize {
    i += 1;
    while i < b.len() {
        match b[i] {
            b'\\' => i += 2,
            c if c == q => return i + 1,
            b'\n' => return i,
            _ => i += 1,
        }
    }
    b.len()
}

impl Lexed<'_> {
    fn text(&self, i: usize) -> &str {
        &self.src[self.toks[i].start..self.toks[i].end]
    }
    fn is(&self, i: usize, s: &str) -> bool {
        i < self.toks.len() && self.text(i) == s
    }
    /// The index of the token closing the bracket opened at `open`.
    fn matching(&self, open: usize) -> Option<usize> {
        let mut depth = 0i32;
        for j in open..self.toks.len() {
            if self.toks[j].kind != Kind::Punct {
                continue;
            }
            match self.text(j) {
                "(" | "[" | "{" => depth += 1,
                ")" | "]" | "}" => {
                    depth -= 1;
                    if depth == 0 {
                        return Some(j);
                    }
                }
                _ => {}
            }
        }
        None
    }
    fn span(&self, a: usize, b: usize) -> &str {
        // Tokens a..b (exclusive), as written.
        if a >= b {
            return "";
        }
        &self.src[self.toks[a].start..self.toks[b - 1].end]
    }
    fn where_(&self, i: usize) -> String {
        format!("{}({})", self.files[self.file_of[i]], self.toks[i].line)
    }
    /// Splits tokens a..b at top-level occurrences of the punctuation `sep`.
    fn split(&self, a: usize, b: usize, sep: &str) -> Vec<(usize, usize)> {
        let mut out = Vec::new();
        let mut depth = 0i32;
        let mut s = a;
        for j in a..b {
            if self.toks[j].kind == Kind::Punct {
                match self.text(j) {
                    "(" | "[" | "{" => depth += 1,
                    ")" | "]" | "}" => depth -= 1,
                    t if t == sep && depth == 0 => {
                        out.push((s, j));
                        s = j + 1;
                    }
                    _ => {}
                }
            }
        }
        out.push((s, b));
        out
    }
}

struct Edits {
    list: Vec<(usize, usize, String)>,
}

impl Edits {
    fn apply(mut self, src: &str) -> String {
        self.list.sort_by_key(|e| e.0);
        let mut out = String::with_capacity(src.len() + 4096);
        let mut pos = 0;
        for (a, b, rep) in self.list {
            if a < pos {
                continue; // nested in an edit already made
            }
            out.push_str(&src[pos..a]);
            out.push_str(&rep);
            for _ in 0..src[a..b].matches('\n').count() {
                out.push('\n');
            }
            pos = b;
        }
        out.push_str(&src[pos..]);
        out
    }
}

const SHARED_ATTR: &str = "__attribute__((section(\"emu_shared\")))";

/// Rewrites the preprocessed unit; an error is a log text (NVRTC form).
pub fn rewrite(src: &str) -> Result<Rewritten, String> {
    let lx = lex(src);
    let n = lx.toks.len();
    let mut edits = Edits { list: Vec::new() };
    let mut kernels = Vec::new();
    let mut errors = String::new();
    // What each open brace encloses.
    let mut braces: Vec<Scope> = Vec::new();
    // The first token of the current declaration or statement (after the last `;`, `{`, `}`).
    let mut head = 0;
    let mut pending_bounds: Option<String> = None;
    let mut i = 0;
    while i < n {
        let t = lx.toks[i];
        let text = lx.text(i);
        match (t.kind, text) {
            (Kind::Punct, "{") => {
                let outer = braces.last().copied().unwrap_or(Scope::Other);
                braces.push(brace_scope(&lx, head, i, outer));
                head = i + 1;
                pending_bounds = None;
            }
            (Kind::Punct, "}") => {
                braces.pop();
                head = i + 1;
                pending_bounds = None;
            }
            (Kind::Punct, ";") => {
                head = i + 1;
                pending_bounds = None;
            }
            (Kind::Ident, "__emu_launch_bounds__") if lx.is(i + 1, "(") => {
                if let Some(close) = lx.matching(i + 1) {
                    let args = lx.split(i + 2, close, ",");
                    pending_bounds = Some(lx.span(args[0].0, args[0].1).to_string());
                    edits
                        .list
                        .push((t.start, lx.toks[close].end, String::new()));
                    i = close + 1;
                    continue;
                }
            }
            (Kind::Ident, "__emu_global__") => {
                edits.list.push((t.start, t.end, String::new()));
                // `extern "C"` right before (possibly with launch bounds in between), or an
                // enclosing `extern "C" { }`.
                let mut j = i;
                while j >= 1 && lx.is(j - 1, ")") {
                    // skip `__emu_launch_bounds__(..)` / `__attribute__((..))` written before
                    let mut depth = 0;
                    let mut k = j - 1;
                    loop {
                        match lx.text(k) {
                            ")" => depth += 1,
                            "(" => depth -= 1,
                            _ => {}
                        }
                        if depth == 0 || k == 0 {
                            break;
                        }
                        k -= 1;
                    }
                    j = k.saturating_sub(1);
                    if !(lx.is(j, "__emu_launch_bounds__") || lx.is(j, "__attribute__")) {
                        j = i;
                        break;
                    }
                }
                let mut ext = braces.contains(&Scope::ExternC);
                if j >= 2 && lx.is(j - 1, "\"C\"") && lx.is(j - 2, "extern") {
                    ext = true;
                }
                // The kernel's name: the identifier before the first top-level `(` that is not
                // an attribute or launch bounds.
                let mut k = i + 1;
                let mut bounds = pending_bounds.take();
                let mut name = None;
                while k < n {
                    let tk = lx.text(k);
                    if matches!(tk, ";" | "{" | "}") {
                        break;
                    }
                    if tk == "(" {
                        let prev = lx.text(k - 1);
                        let close = lx.matching(k).unwrap_or(n - 1);
                        if prev == "__emu_launch_bounds__" {
                            let args = lx.split(k + 1, close, ",");
                            bounds = Some(lx.span(args[0].0, args[0].1).to_string());
                            edits.list.push((
                                lx.toks[k - 1].start,
                                lx.toks[close].end,
                                String::new(),
                            ));
                        } else if prev == "__attribute__"
                            || prev == "__declspec"
                            || prev == "alignas"
                        {
                        } else if lx.toks[k - 1].kind == Kind::Ident {
                            name = Some((k - 1, close));
                            break;
                        }
                        k = close + 1;
                        continue;
                    }
                    k += 1;
                }
                if let Some((ni, close)) = name {
                    // A definition: the parameter list is followed by the body.
                    let mut m = close + 1;
                    while m < n && lx.toks[m].kind == Kind::Ident {
                        m += 1; // e.g. `noexcept`
                    }
                    if ext && lx.is(m, "{") {
                        kernels.push(Kernel {
                            name: lx.text(ni).to_string(),
                            max_threads: bounds,
                        });
                    }
                }
            }
            (Kind::Ident, "__emu_shared__") => {
                if i >= 1 && lx.is(i - 1, "extern") {
                    match extern_shared(&lx, i) {
                        Some((end, rep)) => {
                            edits
                                .list
                                .push((lx.toks[i - 1].start, lx.toks[end].end, rep));
                            i = end + 1;
                            continue;
                        }
                        None => {
                            let _ = writeln!(
                                errors,
                                "{}: error: expected `extern __shared__ TYPE NAME[];`",
                                lx.where_(i)
                            );
                        }
                    }
                } else {
                    let is_static = i >= 1 && lx.is(i - 1, "static");
                    let storage = if is_static { "" } else { "static " };
                    // In a function body: a block static and, after the declaration's `;`, the
                    // marker statement by which compile.rs finds it in the assembly and moves it
                    // into the section emu_shared. (A section attribute here would be dropped for
                    // the statics of templates, and conflict with others for those of inline
                    // functions: COMDAT variables.) Elsewhere, or if the declaration cannot be
                    // read: the section attribute.
                    let marked = if braces.last() == Some(&Scope::Code) {
                        shared_declarators(&lx, i)
                    } else {
                        None
                    };
                    match marked {
                        Some((semi, names)) => {
                            edits.list.push((t.start, t.end, storage.to_string()));
                            let end = lx.toks[semi].end;
                            edits.list.push((end, end, shared_marker(&names)));
                        }
                        None => {
                            edits
                                .list
                                .push((t.start, t.end, format!("{storage}{SHARED_ATTR}")))
                        }
                    }
                }
            }
            (Kind::Ident, "asm" | "__asm__" | "__asm") if t.user => {
                let mut k = i + 1;
                let mut is_goto = false;
                while k < n
                    && matches!(
                        lx.text(k),
                        "volatile" | "__volatile__" | "__volatile" | "inline" | "goto"
                    )
                {
                    is_goto |= lx.is(k, "goto");
                    k += 1;
                }
                if lx.is(k, "(") {
                    if let Some(close) = lx.matching(k) {
                        if is_goto {
                            let _ = writeln!(
                                errors,
                                "{}: error: asm goto is not supported",
                                lx.where_(i)
                            );
                        } else {
                            match rewrite_asm(&lx, k, close) {
                                Ok(rep) => edits.list.push((t.start, lx.toks[close].end, rep)),
                                Err(e) => {
                                    let _ = writeln!(errors, "{}: error: {e}", lx.where_(i));
                                }
                            }
                        }
                        i = close + 1;
                        continue;
                    }
                }
            }
            _ => {}
        }
        i += 1;
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(Rewritten {
        text: edits.apply(src),
        kernels,
    })
}

/// What a `{` opens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Scope {
    /// `extern "C" { .. }`.
    ExternC,
    /// A function body, or a block, lambda or initializer inside one.
    Code,
    /// A namespace, class, enumeration or namespace-scope initializer.
    Other,
}

/// The index after the `>` closing the template parameter list opened at `open` (a `<`), or
/// `end` when it is not closed before it.
fn skip_angles(lx: &Lexed<'_>, open: usize, end: usize) -> usize {
    let (mut angles, mut parens) = (0i32, 0i32);
    for j in open..end {
        match lx.text(j) {
            "(" | "[" => parens += 1,
            ")" | "]" => parens -= 1,
            "<" if parens == 0 => angles += 1,
            ">" if parens == 0 => {
                angles -= 1;
                if angles == 0 {
                    return j + 1;
                }
            }
            _ => {}
        }
    }
    end
}

/// Classifies the `{` at token `brace`, whose declaration or statement starts at token `head`,
/// inside a scope `outer`. Outside code, a head with a top-level `(` (after any template
/// parameter list) is a function definition, unless a class key or an `=` comes before it.
fn brace_scope(lx: &Lexed<'_>, head: usize, brace: usize, outer: Scope) -> Scope {
    if brace >= 2 && lx.is(brace - 1, "\"C\"") && lx.is(brace - 2, "extern") {
        return Scope::ExternC;
    }
    if outer == Scope::Code {
        return Scope::Code;
    }
    let operator = (head..brace).any(|j| lx.is(j, "operator"));
    let mut depth = 0i32;
    let mut j = head;
    while j < brace {
        match lx.text(j) {
            "template" if lx.is(j + 1, "<") => {
                j = skip_angles(lx, j + 1, brace);
                continue;
            }
            "namespace" => return Scope::Other,
            "(" if depth == 0 => return Scope::Code,
            "(" | "[" => depth += 1,
            ")" | "]" => depth -= 1,
            "class" | "struct" | "union" | "enum" if depth == 0 => return Scope::Other,
            "=" if depth == 0 && !operator => return Scope::Other,
            _ => {}
        }
        j += 1;
    }
    Scope::Other
}

/// The `;` ending the `__shared__` declaration whose marker is token `at`, and the names it
/// declares; `None` when it cannot be read (no marker statement is added then).
fn shared_declarators(lx: &Lexed<'_>, at: usize) -> Option<(usize, Vec<String>)> {
    let mut depth = 0i32;
    let mut semi = None;
    for j in at + 1..lx.toks.len() {
        match lx.text(j) {
            "(" | "[" => depth += 1,
            ")" | "]" => depth -= 1,
            ";" if depth == 0 => {
                semi = Some(j);
                break;
            }
            "{" | "}" => return None,
            _ => {}
        }
    }
    let semi = semi?;
    let mut names = Vec::new();
    for (a, b) in lx.split(at + 1, semi, ",") {
        // The declarator's name: the last identifier at the top level before its array bounds
        // or initializer, attributes (`__attribute__((..))`, `alignas(..)`) left out.
        let mut name = None;
        let mut j = a;
        while j < b {
            let tx = lx.text(j);
            if tx == "[" || tx == "=" {
                break;
            }
            if tx == "(" {
                j = lx.matching(j)? + 1;
                continue;
            }
            if lx.toks[j].kind == Kind::Ident
                && !lx.is(j + 1, "(")
                && !matches!(tx, "const" | "volatile")
            {
                name = Some(tx);
            }
            j += 1;
        }
        names.push(name?.to_string());
    }
    (!names.is_empty()).then_some((semi, names))
}

/// The marker statement after a function-scope `__shared__` declaration: an asm statement that
/// emits no instruction, only a comment naming each variable's symbol (the `m` operands), so
/// that compile.rs finds the variables in the assembly, in whatever function they end up
/// (inlined or not, one per template instantiation), and counts them for the kernels that
/// reach that code. See `compile::shared`.
fn shared_marker(names: &[String]) -> String {
    let mut tmpl = String::from(SHARED_MARKER);
    let mut ops = Vec::new();
    for (k, nm) in names.iter().enumerate() {
        let _ = write!(tmpl, " %{k}");
        ops.push(format!("\"m\"({nm})"));
    }
    format!(" __asm__(\"{tmpl}\" :: {});", ops.join(", "))
}

/// The comment the marker statements leave in the assembly, before the variables' operands.
pub const SHARED_MARKER: &str = "# __emu_shared";

/// `extern __shared__ T name[];` at token `at` (the marker): the declaration's `;` and its
/// replacement, a pointer to the block's dynamic shared memory (every such array of a block
/// starts at the same address: CUDA Programming Guide, "__shared__").
fn extern_shared(lx: &Lexed<'_>, at: usize) -> Option<(usize, String)> {
    let mut semi = at;
    while semi < lx.toks.len() && !lx.is(semi, ";") {
        semi += 1;
    }
    if semi >= lx.toks.len() {
        return None;
    }
    let open = (at + 1..semi).find(|&j| lx.is(j, "["))?;
    let name_i = open - 1;
    if lx.toks[name_i].kind != Kind::Ident {
        return None;
    }
    let mut ty = String::new();
    let mut j = at + 1;
    while j < name_i {
        if lx.is(j, "__attribute__") && lx.is(j + 1, "(") {
            j = lx.matching(j + 1)? + 1;
            continue;
        }
        ty.push_str(lx.text(j));
        ty.push(' ');
        j += 1;
    }
    if ty.trim().is_empty() {
        return None;
    }
    let name = lx.text(name_i);
    Some((
        semi,
        format!("static {ty}* const {name} = reinterpret_cast<{ty}*>(__emu_dyn_shared);"),
    ))
}

/// `asm [volatile] ( template [: outputs [: inputs [: clobbers]]] )`, the parentheses at
/// `open`/`close`, as an `__emu_asm(..)` call (contract section 3).
fn rewrite_asm(lx: &Lexed<'_>, open: usize, close: usize) -> Result<String, String> {
    // Sections split at top-level `:` (a `::` is two separators: empty outputs).
    let sections = lx.split(open + 1, close, ":");
    let (ta, tb) = sections[0];
    if ta >= tb || (ta..tb).any(|j| lx.toks[j].kind != Kind::Str) {
        return Err("the asm template must be string literals".into());
    }
    let tmpl: Vec<&str> = (ta..tb).map(|j| lx.text(j)).collect();
    let mut out = format!("__emu_asm({}", tmpl.join(" "));
    for (sec, &(a, b)) in sections.iter().enumerate().skip(1).take(2) {
        if a >= b {
            continue;
        }
        for (oa, ob) in lx.split(a, b, ",") {
            let mut j = oa;
            if lx.is(j, "[") {
                j = lx.matching(j).ok_or("unbalanced [")? + 1;
            }
            if j >= ob || lx.toks[j].kind != Kind::Str {
                return Err(format!("bad asm operand `{}`", lx.span(oa, ob)));
            }
            let c = lx.text(j);
            let c = c.trim_matches('"');
            let ep = j + 1;
            if !lx.is(ep, "(") {
                return Err(format!("bad asm operand `{}`", lx.span(oa, ob)));
            }
            let ec = lx.matching(ep).ok_or("unbalanced (")?;
            let expr = lx.span(ep + 1, ec);
            let modc = c.chars().find(|ch| *ch == '=' || *ch == '+');
            let letter = c
                .chars()
                .find(|ch| ch.is_ascii_alphabetic())
                .ok_or_else(|| format!("asm constraint `{c}` has no letter"))?;
            if sec == 1 {
                let m = modc.unwrap_or('=');
                let _ = write!(out, ", __emu_op('{m}', '{letter}', &({expr}))");
            } else {
                let _ = write!(out, ", __emu_op(0, '{letter}', ({expr}))");
            }
        }
    }
    out.push(')');
    Ok(out)
}

/// The registration block appended to the unit: the kernel table the runtime's C ABI serves.
pub fn registration(kernels: &[Kernel]) -> String {
    let mut s = String::from("\n# 1 \"<emu-registration>\"\n");
    for (i, k) in kernels.iter().enumerate() {
        let _ = writeln!(
            s,
            "static void __emu_entry_{i}(void** p) {{ __emu_call(&{}, p); }}",
            k.name
        );
    }
    s.push_str("static const EmuKernel __emu_kernel_table[] = {\n");
    for (i, k) in kernels.iter().enumerate() {
        let bounds = k.max_threads.as_deref().unwrap_or("1024");
        let _ = writeln!(
            s,
            "  {{\"{n}\", &__emu_entry_{i}, EmuSig<decltype(&{n})>::n, EmuSig<decltype(&{n})>::sizes, (unsigned)({bounds})}},",
            n = k.name
        );
    }
    s.push_str("  {nullptr, nullptr, 0, nullptr, 0}};\n");
    s.push_str("static const char* const __emu_name_table[] = {");
    for k in kernels {
        let _ = write!(s, "\"{}\", ", k.name);
    }
    s.push_str("nullptr};\n");
    s.push_str("static const EmuKernel* __emu_kernels() { return __emu_kernel_table; }\n");
    s.push_str("static const char* const* __emu_names() { return __emu_name_table; }\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_markers_name_the_next_line() {
        // g++ 12 starts with `# 0 "<built-in>"`: line 0 (in a debug build, `0 - 1` would panic).
        let src = "# 0 \"<built-in>\"\nint a;\n# 0 \"<command-line>\"\n# 1 \"k.cu\"\nint b;\n\n asm goto(\"x\" : : : : l);\n";
        let lx = lex(src);
        let at = |t: &str| (0..lx.toks.len()).find(|&j| lx.is(j, t)).unwrap();
        assert_eq!(lx.toks[at("a")].line, 0);
        assert_eq!(lx.where_(at("b")), "k.cu(1)");
        assert_eq!(lx.where_(at("asm")), "k.cu(3)");
        match rewrite(src) {
            Err(e) => assert_eq!(e, "k.cu(3): error: asm goto is not supported\n"),
            Ok(_) => panic!("asm goto accepted"),
        }
    }

    #[test]
    fn shared_declarations_in_functions_are_marked() {
        let src = "# 1 \"k.cu\"\nnamespace n { __emu_shared__ float g[2]; }\nstruct S { int x; };\n\
            template <class T, int N = (3 > 2)> __attribute__((noinline)) void f(T* x) {\n\
            __emu_shared__ __attribute__((aligned(16))) T a[N * 4], b;\n\
            if (x) { static __emu_shared__ int c[2][3]; }\n}\n\
            extern \"C\" { __emu_global__ void k() { __emu_shared__ unsigned char raw[(1 > 0) ? 8 : 4]; } }\n";
        let r = rewrite(src).unwrap();
        assert_eq!(r.text.lines().count(), src.lines().count());
        let t = &r.text;
        assert!(
            t.contains(
                "namespace n { static __attribute__((section(\"emu_shared\"))) float g[2]; }"
            ),
            "{t}"
        );
        assert!(
            t.contains("static  __attribute__((aligned(16))) T a[N * 4], b; __asm__(\"# __emu_shared %0 %1\" :: \"m\"(a), \"m\"(b));"),
            "{t}"
        );
        assert!(
            t.contains("static  int c[2][3]; __asm__(\"# __emu_shared %0\" :: \"m\"(c));"),
            "{t}"
        );
        assert!(
            t.contains("__asm__(\"# __emu_shared %0\" :: \"m\"(raw));"),
            "{t}"
        );
        assert_eq!(r.kernels.len(), 1);
    }

    #[test]
    fn asm_and_markers() {
        let src = "# 1 \"k.cu\"\nextern \"C\" __emu_global__ void __emu_launch_bounds__(128, 2)\n k(float* x) {\n  __emu_shared__ float s[4];\n  extern __emu_shared__ __attribute__((aligned(16))) float dyn[];\n  unsigned r; asm volatile(\"cvt %0, %1;\"\n \"x\" : \"=r\"(r) : \"f\"(x[0]) : \"memory\");\n}\n";
        let r = rewrite(src).unwrap();
        assert_eq!(r.text.lines().count(), src.lines().count());
        assert_eq!(
            r.kernels,
            [Kernel {
                name: "k".into(),
                max_threads: Some("128".into())
            }]
        );
        assert!(r.text.contains("__emu_asm(\"cvt %0, %1;\" \"x\", __emu_op('=', 'r', &(r)), __emu_op(0, 'f', (x[0])))"), "{}", r.text);
        assert!(
            r.text.contains(
                "static float * const dyn = reinterpret_cast<float *>(__emu_dyn_shared);"
            ),
            "{}",
            r.text
        );
        assert!(r
            .text
            .contains("static  float s[4]; __asm__(\"# __emu_shared %0\" :: \"m\"(s));"));
    }
}
