//! A linear scan of a pickle's opcodes that never executes anything. It lists the
//! globals the pickle would import (for the safe loader and `inspect`), checks every
//! length and memo index against hard bounds *before* Python's unpickler could
//! allocate for them, and tells whether any persistent id (a storage) is memoized
//! or duplicated, which decides whether the loader may build tensors lazily.

use crate::error::{Error, Result};

/// Pickle opcodes by name (those the native pickler writes and the native unpickler
/// reads).
pub mod op {
    pub const PROTO: u8 = 0x80;
    pub const FRAME: u8 = 0x95;
    pub const STOP: u8 = b'.';
    pub const MARK: u8 = b'(';
    pub const GLOBAL: u8 = b'c';
    pub const STACK_GLOBAL: u8 = 0x93;
    pub const BINPUT: u8 = b'q';
    pub const LONG_BINPUT: u8 = b'r';
    pub const MEMOIZE: u8 = 0x94;
    pub const BINGET: u8 = b'h';
    pub const LONG_BINGET: u8 = b'j';
    pub const SHORT_BINUNICODE: u8 = 0x8c;
    pub const BINUNICODE: u8 = b'X';
    pub const BINUNICODE8: u8 = 0x8d;
    pub const SHORT_BINBYTES: u8 = b'C';
    pub const BINBYTES: u8 = b'B';
    pub const BINBYTES8: u8 = 0x8e;
    pub const BININT: u8 = b'J';
    pub const BININT1: u8 = b'K';
    pub const BININT2: u8 = b'M';
    pub const LONG1: u8 = 0x8a;
    pub const BINFLOAT: u8 = b'G';
    pub const NONE: u8 = b'N';
    pub const NEWTRUE: u8 = 0x88;
    pub const NEWFALSE: u8 = 0x89;
    pub const EMPTY_TUPLE: u8 = b')';
    pub const TUPLE: u8 = b't';
    pub const TUPLE1: u8 = 0x85;
    pub const TUPLE2: u8 = 0x86;
    pub const TUPLE3: u8 = 0x87;
    pub const EMPTY_LIST: u8 = b']';
    pub const APPEND: u8 = b'a';
    pub const APPENDS: u8 = b'e';
    pub const EMPTY_DICT: u8 = b'}';
    pub const SETITEM: u8 = b's';
    pub const SETITEMS: u8 = b'u';
    pub const REDUCE: u8 = b'R';
    pub const BUILD: u8 = b'b';
    pub const BINPERSID: u8 = b'Q';
}

/// What the scan learned.
#[derive(Debug, Default, Clone)]
pub struct PickleScan {
    /// `(module, name)` of every global, first-seen order, without repeats.
    pub globals: Vec<(String, String)>,
    /// Number of persistent-id opcodes (one per storage reference).
    pub persistent_ids: usize,
    /// Number of BUILD opcodes (a weights-only load gives them torch's semantics).
    pub builds: usize,
    /// SETITEM(S) / APPEND(S) whose target the scan cannot show to be a dict (or
    /// `OrderedDict` / `Counter`) or a list: torch's weights-only unpickler refuses them
    /// on anything else, which only a Python-level unpickler can check.
    pub untyped_mutations: usize,
    /// A persistent id was memoized or duplicated: it can be reached twice.
    pub persistent_id_reused: bool,
    /// The protocol from the PROTO opcode (0 or 1 when absent).
    pub protocol: u8,
    /// Opcodes that a weights-only load refuses: out-of-band buffers, extensions, and
    /// BUILD / SETITEM / APPEND aimed at an imported global, which would modify that
    /// class or function for the whole process.
    pub unsafe_opcodes: Vec<String>,
    /// Offset just past the STOP opcode (where a following pickle would start).
    pub end: usize,
    /// Bit `k` (of byte `k / 8`, least significant first) is set when memo key `k` is
    /// read by a GET: keys that are never read need not be kept (torch's pickler
    /// memoizes every tuple and string).
    pub memo_read: Vec<u8>,
}

/// What the scanner tracks of a stack value: strings as byte ranges of the pickle
/// (no allocation per string), persistent ids, and everything else.
#[derive(Clone, Copy, Debug)]
enum Val {
    Str(usize, usize),
    Persid,
    /// An object imported by GLOBAL / STACK_GLOBAL / EXT: a class or function;
    /// `dict_class` when it is `collections.OrderedDict` or `collections.Counter`.
    Global {
        dict_class: bool,
    },
    /// A dict (EMPTY_DICT, DICT) or what calling a dict class returns.
    Dict,
    /// A list (EMPTY_LIST, LIST).
    List,
    Other,
}

fn is_dict_class(module: &[u8], name: &[u8]) -> bool {
    module == b"collections" && (name == b"OrderedDict" || name == b"Counter")
}

/// The largest memo index accepted beyond the number of values memoized so far.
const MEMO_SLACK: u64 = 1 << 16;
/// The deepest stack accepted (Python's unpickler grows it without bound).
const MAX_STACK: usize = 1 << 24;

struct Scanner<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Scanner<'a> {
    #[cold]
    fn err(&self, msg: impl std::fmt::Display) -> Error {
        Error::Pickle(format!("{msg} (at byte {})", self.pos))
    }
    #[cold]
    fn short(&self, n: u64) -> Error {
        self.err(format!(
            "declares {n} bytes but only {} remain: truncated or corrupted",
            self.data.len() - self.pos.min(self.data.len())
        ))
    }
    // Inlined: called for every opcode and argument (a call each was a quarter of a
    // scan's time).
    #[inline(always)]
    fn take(&mut self, n: u64) -> Result<&'a [u8]> {
        match usize::try_from(n)
            .ok()
            .and_then(|n| self.pos.checked_add(n))
            .filter(|&e| e <= self.data.len())
        {
            Some(end) => {
                let s = &self.data[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => Err(self.short(n)),
        }
    }
    #[inline(always)]
    fn u8(&mut self) -> Result<u8> {
        match self.data.get(self.pos) {
            Some(&b) => {
                self.pos += 1;
                Ok(b)
            }
            None => Err(self.short(1)),
        }
    }
    #[inline(always)]
    fn le(&mut self, n: usize) -> Result<u64> {
        let b = self.take(n as u64)?;
        let mut v = 0u64;
        for (i, &x) in b.iter().enumerate() {
            v |= (x as u64) << (8 * i);
        }
        Ok(v)
    }
    fn line(&mut self) -> Result<&'a [u8]> {
        let rest = &self.data[self.pos..];
        let n = rest
            .iter()
            .position(|&c| c == b'\n')
            .ok_or_else(|| self.err("unterminated line argument"))?;
        self.pos += n + 1;
        Ok(&rest[..n])
    }
}

/// The scanner's memo, 8 bytes a key: torch's pickler memoizes every string and
/// tuple, so 24-byte entries were megabytes of fresh memory for a big state dict.
#[derive(Default)]
struct Memo {
    /// Low 3 bits: 0 unset, 1 Persid, 2 Global (bit 3: a dict class), 3 Other, 4 a
    /// string (its length in the next 24 bits, its start above), 5 a string in `long`
    /// (index above), 6 Dict, 7 List.
    keys: Vec<u64>,
    long: Vec<(usize, usize)>,
}

impl Memo {
    fn get(&self, i: usize) -> Option<Val> {
        let k = *self.keys.get(i)?;
        Some(match k & 7 {
            1 => Val::Persid,
            2 => Val::Global {
                dict_class: k & 8 != 0,
            },
            3 => Val::Other,
            6 => Val::Dict,
            7 => Val::List,
            4 => {
                let (len, start) = ((k >> 3) & 0xff_ffff, k >> 27);
                Val::Str(start as usize, (start + len) as usize)
            }
            5 => {
                let (a, b) = self.long[(k >> 3) as usize];
                Val::Str(a, b)
            }
            _ => return None,
        })
    }

    /// Sets key `i`; true when it was unset.
    fn set(&mut self, i: usize, v: Val) -> bool {
        let k = match v {
            Val::Persid => 1,
            Val::Global { dict_class } => 2 | (dict_class as u64) << 3,
            Val::Other => 3,
            Val::Dict => 6,
            Val::List => 7,
            Val::Str(a, b) if b - a < 1 << 24 && (a as u64) < 1 << 37 => {
                4 | ((b - a) as u64) << 3 | (a as u64) << 27
            }
            Val::Str(a, b) => {
                self.long.push((a, b));
                5 | ((self.long.len() - 1) as u64) << 3
            }
        };
        if i >= self.keys.len() {
            self.keys.resize(i + 1, 0);
        }
        std::mem::replace(&mut self.keys[i], k) == 0
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Scans `data`, a complete pickle. Errors on truncation, unknown opcodes, stack
/// underflow and memo indices far beyond what the pickle has memoized.
pub fn scan(data: &[u8]) -> Result<PickleScan> {
    let mut s = Scanner { data, pos: 0 };
    let mut out = PickleScan::default();
    let mut stack: Vec<Val> = Vec::new();
    let mut marks: Vec<usize> = Vec::new();
    // Indexed by memo key; the bound checked at every PUT keeps it small.
    let mut memo = Memo::default();
    let range = |s: &Scanner<'_>, b: &[u8]| -> Val {
        let end = s.pos;
        Val::Str(end - b.len(), end)
    };
    let mut memo_puts = 0u64;
    let mut seen = std::collections::HashSet::new();

    macro_rules! pop {
        () => {
            match stack.pop() {
                Some(v) => {
                    if marks.last().is_some_and(|&m| m > stack.len()) {
                        return Err(s.err("stack underflow past a MARK"));
                    }
                    v
                }
                None => return Err(s.err("stack underflow")),
            }
        };
    }
    macro_rules! pop_mark {
        () => {{
            let m = marks.pop().ok_or_else(|| s.err("no MARK to pop to"))?;
            stack.truncate(m);
        }};
    }
    macro_rules! push {
        ($v:expr) => {{
            if stack.len() >= MAX_STACK {
                return Err(Error::LimitExceeded(
                    "pickle stack deeper than 2**24".into(),
                ));
            }
            stack.push($v)
        }};
    }
    let mut add_global = |out: &mut PickleScan, m: String, n: String| {
        if seen.insert((m.clone(), n.clone())) {
            out.globals.push((m, n));
        }
    };

    loop {
        let op_pos = s.pos;
        let op = s
            .u8()
            .map_err(|_| s.err("pickle ends without a STOP opcode"))?;
        match op {
            b'.' => {
                out.end = s.pos;
                break;
            }
            b'(' => marks.push(stack.len()),
            b'0' => {
                if stack.is_empty() || marks.last() == Some(&stack.len()) {
                    pop_mark!();
                } else {
                    pop!();
                }
            }
            b'1' => pop_mark!(),
            b'2' => {
                let top = *stack.last().ok_or_else(|| s.err("DUP on empty stack"))?;
                if matches!(top, Val::Persid) {
                    out.persistent_id_reused = true;
                }
                push!(top)
            }
            b'F' | b'I' | b'L' => {
                s.line()?;
                push!(Val::Other)
            }
            b'J' => {
                s.le(4)?;
                push!(Val::Other)
            }
            b'K' => {
                s.le(1)?;
                push!(Val::Other)
            }
            b'M' => {
                s.le(2)?;
                push!(Val::Other)
            }
            b'G' => {
                s.le(8)?;
                push!(Val::Other)
            }
            b'}' => push!(Val::Dict),
            b']' => push!(Val::List),
            b'N' | 0x88 | 0x89 | b')' | 0x8f => push!(Val::Other),
            b'P' => {
                s.line()?;
                out.persistent_ids += 1;
                push!(Val::Persid)
            }
            b'Q' => {
                pop!();
                out.persistent_ids += 1;
                push!(Val::Persid)
            }
            b'R' | 0x81 => {
                pop!();
                let callable = pop!();
                push!(match callable {
                    Val::Global { dict_class: true } => Val::Dict,
                    _ => Val::Other,
                })
            }
            0x92 => {
                pop!();
                pop!();
                pop!();
                push!(Val::Other)
            }
            b'b' => {
                pop!();
                out.builds += 1;
                mutation_target(&mut out, &stack, "BUILD", op_pos);
            }
            b'S' => {
                let l = s.line()?;
                // The line ends one byte (the newline) before the position.
                let end = s.pos - 1;
                let start = end - l.len();
                let quoted = l.len() >= 2 && (l[0] == b'\'' || l[0] == b'"');
                push!(if quoted {
                    Val::Str(start + 1, end - 1)
                } else {
                    Val::Str(start, end)
                })
            }
            b'V' => {
                let l = s.line()?;
                let end = s.pos - 1;
                push!(Val::Str(end - l.len(), end))
            }
            b'T' | b'X' => {
                let n = s.le(4)?;
                let b = s.take(n)?;
                push!(range(&s, b))
            }
            b'U' | 0x8c => {
                let n = s.le(1)?;
                let b = s.take(n)?;
                push!(range(&s, b))
            }
            0x8d => {
                let n = s.le(8)?;
                let b = s.take(n)?;
                push!(range(&s, b))
            }
            b'B' => {
                let n = s.le(4)?;
                s.take(n)?;
                push!(Val::Other)
            }
            b'C' => {
                let n = s.le(1)?;
                s.take(n)?;
                push!(Val::Other)
            }
            0x8e | 0x96 => {
                let n = s.le(8)?;
                s.take(n)?;
                push!(Val::Other)
            }
            0x8a => {
                let n = s.le(1)?;
                s.take(n)?;
                push!(Val::Other)
            }
            0x8b => {
                let n = s.le(4)?;
                s.take(n)?;
                push!(Val::Other)
            }
            b'c' | b'i' => {
                let m = s.line()?;
                let n = s.line()?;
                let dict_class = is_dict_class(m, n);
                add_global(&mut out, text(m), text(n));
                if op == b'i' {
                    pop_mark!();
                    push!(if dict_class { Val::Dict } else { Val::Other })
                } else {
                    push!(Val::Global { dict_class })
                }
            }
            0x93 => {
                let name = pop!();
                let module = pop!();
                let dict_class = match (module, name) {
                    (Val::Str(m0, m1), Val::Str(n0, n1)) => {
                        add_global(&mut out, text(&data[m0..m1]), text(&data[n0..n1]));
                        is_dict_class(&data[m0..m1], &data[n0..n1])
                    }
                    _ => {
                        add_global(&mut out, "<dynamic>".into(), "<dynamic>".into());
                        false
                    }
                };
                push!(Val::Global { dict_class })
            }
            b'a' => {
                pop!();
                mutation_target(&mut out, &stack, "APPEND", op_pos);
                typed_target(&mut out, &stack, Val::List);
            }
            b'e' | b'u' | 0x90 => {
                pop_mark!();
                let name = match op {
                    b'e' => "APPENDS",
                    b'u' => "SETITEMS",
                    _ => "ADDITEMS",
                };
                mutation_target(&mut out, &stack, name, op_pos);
                match op {
                    b'e' => typed_target(&mut out, &stack, Val::List),
                    b'u' => typed_target(&mut out, &stack, Val::Dict),
                    _ => {}
                }
            }
            b's' => {
                pop!();
                pop!();
                mutation_target(&mut out, &stack, "SETITEM", op_pos);
                typed_target(&mut out, &stack, Val::Dict);
            }
            b'd' => {
                pop_mark!();
                push!(Val::Dict)
            }
            b'l' => {
                pop_mark!();
                push!(Val::List)
            }
            b't' | 0x91 => {
                pop_mark!();
                push!(Val::Other)
            }
            b'o' => {
                pop_mark!();
                push!(Val::Other)
            }
            0x85 => {
                pop!();
                push!(Val::Other)
            }
            0x86 => {
                pop!();
                pop!();
                push!(Val::Other)
            }
            0x87 => {
                pop!();
                pop!();
                pop!();
                push!(Val::Other)
            }
            b'g' | b'h' | b'j' => {
                let idx = match op {
                    b'g' => parse_index(s.line()?).ok_or_else(|| s.err("bad GET index"))?,
                    b'h' => s.le(1)?,
                    _ => s.le(4)?,
                };
                let v = usize::try_from(idx)
                    .ok()
                    .and_then(|i| memo.get(i))
                    .ok_or_else(|| s.err(format!("memo key {idx} read before it is written")))?;
                // In range: the key is below memo.len(), which PUT bounds.
                let k = idx as usize;
                if out.memo_read.len() <= k / 8 {
                    out.memo_read.resize(k / 8 + 1, 0);
                }
                out.memo_read[k / 8] |= 1 << (k % 8);
                push!(v)
            }
            b'p' | b'q' | b'r' | 0x94 => {
                let idx = match op {
                    b'p' => parse_index(s.line()?).ok_or_else(|| s.err("bad PUT index"))?,
                    b'q' => s.le(1)?,
                    b'r' => s.le(4)?,
                    _ => memo_puts,
                };
                if idx > memo_puts * 2 + MEMO_SLACK {
                    return Err(Error::LimitExceeded(format!(
                        "pickle memo index {idx} at byte {op_pos} is far beyond the {memo_puts} values memoized so far (memo abuse)"
                    )));
                }
                let top = *stack.last().ok_or_else(|| s.err("PUT on empty stack"))?;
                if matches!(top, Val::Persid) {
                    out.persistent_id_reused = true;
                }
                // MEMOIZE numbers entries by how many are set, as `_pickle` does, so a
                // PUT that overwrites an entry does not count.
                if memo.set(idx as usize, top) {
                    memo_puts += 1;
                }
            }
            0x80 => out.protocol = s.u8()?,
            0x95 => {
                let n = s.le(8)?;
                if n > (s.data.len() - s.pos) as u64 {
                    return Err(s.err(format!("FRAME of {n} bytes runs past the end")));
                }
            }
            0x82..=0x84 => {
                let w = match op {
                    0x82 => 1,
                    0x83 => 2,
                    _ => 4,
                };
                s.le(w)?;
                out.unsafe_opcodes.push(format!("EXT{w}"));
                push!(Val::Global { dict_class: false })
            }
            0x97 => {
                out.unsafe_opcodes.push("NEXT_BUFFER".into());
                push!(Val::Other)
            }
            0x98 => out.unsafe_opcodes.push("READONLY_BUFFER".into()),
            other => {
                return Err(Error::Pickle(format!(
                    "unknown opcode 0x{other:02x} at byte {op_pos}"
                )))
            }
        }
    }
    Ok(out)
}

/// Counts a SETITEM / APPEND whose target is not known to be of the kind it needs.
fn typed_target(out: &mut PickleScan, stack: &[Val], kind: Val) {
    let ok = matches!(
        (stack.last(), kind),
        (Some(Val::Dict), Val::Dict) | (Some(Val::List), Val::List)
    );
    if !ok {
        out.untyped_mutations += 1;
    }
}

/// Records an unsafe mutation when the object an opcode modifies is an imported global.
fn mutation_target(out: &mut PickleScan, stack: &[Val], opcode: &str, at: usize) {
    if matches!(stack.last(), Some(Val::Global { .. })) {
        out.unsafe_opcodes
            .push(format!("{opcode} on an imported global (at byte {at})"));
    }
}

fn parse_index(line: &[u8]) -> Option<u64> {
    std::str::from_utf8(line).ok()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_globals_of_protocol_2() {
        // pickle.dumps(collections.OrderedDict(), protocol=2)
        let p = b"\x80\x02ccollections\nOrderedDict\nq\x00)Rq\x01.";
        let s = scan(p).unwrap();
        assert_eq!(s.protocol, 2);
        assert_eq!(
            s.globals,
            vec![("collections".into(), "OrderedDict".into())]
        );
    }

    #[test]
    fn resolves_stack_global_through_memo() {
        // protocol 4: SHORT_BINUNICODE 'os', MEMOIZE, SHORT_BINUNICODE 'system', STACK_GLOBAL
        let p = b"\x80\x04\x8c\x02os\x94\x8c\x06system\x94\x93\x94.";
        let s = scan(p).unwrap();
        assert_eq!(s.globals, vec![("os".into(), "system".into())]);
    }

    #[test]
    fn flags_memoized_persistent_ids() {
        let p = b"\x80\x02K\x01Qq\x00.";
        assert!(scan(p).unwrap().persistent_id_reused);
        let p = b"\x80\x02K\x01Q.";
        let s = scan(p).unwrap();
        assert!(!s.persistent_id_reused);
        assert_eq!(s.persistent_ids, 1);
    }

    #[test]
    fn memo_entries_pack_into_eight_bytes_and_back() {
        let mut m = Memo::default();
        let vals = [
            Val::Persid,
            Val::Global { dict_class: false },
            Val::Global { dict_class: true },
            Val::Dict,
            Val::List,
            Val::Other,
            Val::Str(0, 0),
            Val::Str(12, 40),
            Val::Str((1 << 37) - 1, (1 << 37) + 5), // start at the packed limit
            Val::Str(1 << 40, (1 << 40) + 3),       // start beyond it
            Val::Str(7, 7 + (1 << 24)),             // length beyond it
        ];
        for (i, v) in vals.iter().enumerate() {
            assert!(m.set(i * 3, *v), "key {i} was unset");
        }
        assert!(!m.set(0, Val::Other), "overwriting a set key");
        assert!(matches!(m.get(0), Some(Val::Other)));
        assert!(m.get(1).is_none() && m.get(10_000).is_none());
        for (i, v) in vals.iter().enumerate().skip(1) {
            let got = m.get(i * 3).expect("set");
            assert_eq!(format!("{got:?}"), format!("{v:?}"));
        }
    }

    #[test]
    fn counts_setitem_and_append_on_targets_of_unknown_kind() {
        // A state dict as torch pickles it: OrderedDict() via REDUCE, then SETITEMS;
        // a list with APPENDS; a dict through the memo: nothing to flag.
        let ok = b"\x80\x02ccollections\nOrderedDict\nq\x00)Rq\x01(X\x01\x00\x00\x00a]q\x02(K\x01K\x02eu}q\x03h\x03K\x01K\x02s0.";
        assert_eq!(scan(ok).unwrap().untyped_mutations, 0);
        // SETITEM on what a REDUCE of another global returned (a tensor, say).
        let bad = b"\x80\x02cbuiltins\nbytearray\nq\x00)RK\x00K\x01s.";
        assert_eq!(scan(bad).unwrap().untyped_mutations, 1);
        // APPEND on a dict, SETITEM on a list.
        assert_eq!(scan(b"\x80\x02}K\x01a.").unwrap().untyped_mutations, 1);
        assert_eq!(scan(b"\x80\x02]K\x01K\x02s.").unwrap().untyped_mutations, 1);
        // A Counter via STACK_GLOBAL is a dict class too.
        let counter = b"\x80\x04\x8c\x0bcollections\x8c\x07Counter\x93)RK\x01K\x02s.";
        assert_eq!(scan(counter).unwrap().untyped_mutations, 0);
    }

    #[test]
    fn memoize_counts_set_entries_not_puts() {
        // K 1, PUT 0, PUT 0 (overwrite), K 2, MEMOIZE (-> key 1), GET 1, STOP
        let s = scan(b"\x80\x04K\x01q\x00q\x00K\x02\x94h\x01.").unwrap();
        assert_eq!(s.end, 14);
    }

    #[test]
    fn refuses_memo_abuse() {
        let p = b"\x80\x02K\x01r\x00\x00\x00\x80.";
        assert!(matches!(scan(p), Err(Error::LimitExceeded(_))));
    }

    #[test]
    fn refuses_truncation_and_oversized_lengths() {
        assert!(scan(b"\x80\x02").is_err());
        assert!(scan(b"\x80\x02X\xff\xff\xff\x7fab.").is_err());
        assert!(scan(b"\x80\x02\x95\x00\x00\x00\x00\x00\x00\x01\x00N.").is_err());
    }

    #[test]
    fn flags_build_on_an_imported_global() {
        // GLOBAL collections Counter; (None, {'most_common': 1}); BUILD -> setattr on the class
        let p = b"\x80\x02ccollections\nCounter\nN}X\x0b\x00\x00\x00most_commonK\x01s\x86b.";
        let s = scan(p).unwrap();
        assert_eq!(s.unsafe_opcodes.len(), 1, "{:?}", s.unsafe_opcodes);
        assert!(s.unsafe_opcodes[0].starts_with("BUILD"));
        // BUILD on an instance (what OrderedDict._metadata uses) is fine.
        let p = b"\x80\x02ccollections\nOrderedDict\n)R}X\x01\x00\x00\x00aK\x01sb.";
        assert!(scan(p).unwrap().unsafe_opcodes.is_empty());
        // ...also when the global comes back from the memo.
        let p = b"\x80\x02ccollections\nCounter\nq\x000h\x00N}\x86b.";
        assert_eq!(scan(p).unwrap().unsafe_opcodes.len(), 1);
    }

    #[test]
    fn reports_where_the_pickle_ends() {
        let s = scan(b"\x80\x02K\x01.trailing").unwrap();
        assert_eq!(s.end, 5);
    }

    #[test]
    fn refuses_stack_underflow() {
        assert!(scan(b"\x80\x02R.").is_err());
    }
}
