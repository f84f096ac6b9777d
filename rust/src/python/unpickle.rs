//! A native unpickler for the pickles state dicts are made of.
//!
//! `torch.save(model.state_dict())` writes a protocol-2 pickle of dicts, strings,
//! numbers, tuples and one `_rebuild_tensor_v2` call per tensor. Python's unpickler
//! spends most of a small tensor's time on that call: a `persistent_load` call, five
//! argument tuples, an empty `OrderedDict` of backward hooks, and the rebuild call.
//! This machine runs the same opcodes natively. Tuples and empty `OrderedDict`s stay
//! Rust values until something needs them as Python objects (they live in arenas and
//! values refer to them by index, so every reference to one memoized value gets the
//! same object, and torch's habit of memoizing every tuple costs no allocation),
//! storages are slots of the `TensorBuilder` it runs with (`builder.rs`), and a
//! rebuild reads its arguments straight from those values.
//!
//! It implements a subset of pickle exactly as CPython's `_pickle` does, and gives up
//! (`Outcome::Unsupported`) on anything outside it: an opcode it does not know, a
//! malformed or truncated stream, a value of an unexpected type, a storage used other
//! than by a tensor rebuild. The caller then runs the ordinary unpickler from the
//! start, so every error and every rare case keeps its single definition there.
//! Globals are resolved by the caller (its `find_class`, with the weights-only policy)
//! before this runs; the machine only looks them up.

use std::cell::OnceCell;

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyFloat, PyList, PyString, PyTuple};
use rustc_hash::FxHashMap;

use super::builder::{text_of, Extras, Retyped, TensorBuilder, View};
use super::errors::CheckpointError;
use crate::pickle::op;

/// The tensor rebuild functions, which run natively and so have no object here.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Native {
    RebuildV2,
    RebuildV3,
}

/// A tuple not yet made into a Python object: `items[start..start + len]` of the
/// machine's item arena, and the object once made.
struct LazyTuple {
    start: usize,
    len: usize,
    obj: OnceCell<Py<PyAny>>,
    /// Memoized: other references to it may exist (see `Machine::release`).
    shared: bool,
}

/// A string of the pickle, made a Python object only when something needs one (a
/// storage key, say, is only looked up). Made once, so every reference to a memoized
/// string gets the same object, as with `_pickle`.
struct LazyStr {
    /// Its UTF-8 bytes in the pickle (already validated).
    start: usize,
    len: usize,
    obj: OnceCell<Py<PyAny>>,
    /// Memoized: other references to it may exist (see `Machine::release`).
    shared: bool,
}

enum Value {
    Obj(Py<PyAny>),
    /// An index into the machine's strings.
    Str(usize),
    Native(Native),
    Int(i64),
    /// An index into the machine's tuples.
    Tuple(usize),
    /// `OrderedDict()`, what torch pickles as each tensor's backward hooks: an index
    /// into the machine's empty ordered dicts.
    EmptyOrderedDict(usize),
    /// A storage: an index into the machine's slots.
    Storage(usize),
}

impl Value {
    fn clone_ref(&self, py: Python<'_>) -> Value {
        match self {
            Value::Obj(o) => Value::Obj(o.clone_ref(py)),
            Value::Native(n) => Value::Native(*n),
            Value::Int(i) => Value::Int(*i),
            Value::Str(i) => Value::Str(*i),
            Value::Tuple(t) => Value::Tuple(*t),
            Value::EmptyOrderedDict(c) => Value::EmptyOrderedDict(*c),
            Value::Storage(s) => Value::Storage(*s),
        }
    }
}

/// How a run ended.
pub enum Outcome {
    Done(Py<PyAny>),
    /// Something this machine does not handle: run the ordinary unpickler instead.
    Unsupported,
}

/// The globals a pickle imports, resolved ahead of time by the caller.
pub struct Globals {
    pub objects: FxHashMap<(String, String), Py<PyAny>>,
    pub natives: FxHashMap<(String, String), Native>,
    /// `collections.OrderedDict`, whose instances BUILD may set attributes on.
    pub ordered_dict: Py<PyAny>,
    /// The scan's bitmap of memo keys some GET reads (`PickleScan::memo_read`);
    /// `None` keeps every key.
    pub memo_read: Option<Vec<u8>>,
}

struct Cursor<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let s = self.data.get(self.pos..end)?;
        self.pos = end;
        Some(s)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn le(&mut self, n: usize) -> Option<u64> {
        let b = self.take(n)?;
        let mut v = [0u8; 8];
        v[..n].copy_from_slice(b);
        Some(u64::from_le_bytes(v))
    }
    fn line(&mut self) -> Option<&'a str> {
        let rest = self.data.get(self.pos..)?;
        let n = rest.iter().position(|&b| b == b'\n')?;
        self.pos += n + 1;
        std::str::from_utf8(&rest[..n]).ok()
    }
}

/// Runs the pickle `data`, building storages and tensors with `builder`.
pub(crate) fn run<B: TensorBuilder>(
    py: Python<'_>,
    builder: &mut B,
    data: &[u8],
    globals: &Globals,
) -> PyResult<Outcome> {
    let mut m = Machine {
        py,
        cur: Cursor { data, pos: 0 },
        stack: Vec::with_capacity(64),
        marks: Vec::new(),
        // Sized for a state dict's pickle up front (bounded: a pickle may be mostly
        // one large bytes value).
        memo: FxHashMap::default(),
        memo_set: Vec::new(),
        memo_len: 0,
        tuples: Vec::with_capacity((data.len() / 16).min(1 << 20)),
        items: Vec::with_capacity((data.len() / 8).min(1 << 21)),
        strings: Vec::with_capacity((data.len() / 32).min(1 << 20)),
        released: Vec::new(),
        ordered_dicts: Vec::new(),
        slots: Vec::new(),
        slot_of_record: Vec::new(),
        globals,
    };
    match m.run(builder) {
        Ok(Some(v)) => Ok(Outcome::Done(v)),
        Ok(None) => Ok(Outcome::Unsupported),
        // A checkpoint error (a view past its storage, say) is the same error the
        // ordinary path would raise, and an interrupt or lack of memory must not start
        // the load over; anything else the ordinary path reports in its own words.
        Err(e)
            if e.is_instance_of::<CheckpointError>(py)
                || e.is_instance_of::<pyo3::exceptions::PyMemoryError>(py)
                || !e.is_instance_of::<pyo3::exceptions::PyException>(py) =>
        {
            Err(e)
        }
        Err(_) => Ok(Outcome::Unsupported),
    }
}

struct Machine<'py, 'a, B: TensorBuilder> {
    py: Python<'py>,
    cur: Cursor<'a>,
    stack: Vec<Value>,
    marks: Vec<usize>,
    /// The values of memo keys that some GET reads (all keys without a scan).
    memo: FxHashMap<usize, Value>,
    /// Bit per memo key: set (kept or not).
    memo_set: Vec<u64>,
    /// How many memo entries are set (what MEMOIZE numbers the next one).
    memo_len: usize,
    /// Arenas: tuples, their items, and empty ordered dicts, referred to by index.
    tuples: Vec<LazyTuple>,
    items: Vec<Value>,
    strings: Vec<LazyStr>,
    /// Scratch for `release`.
    released: Vec<Value>,
    ordered_dicts: Vec<OnceCell<Py<PyAny>>>,
    slots: Vec<B::Slot>,
    /// Record index -> index into `slots` (u32::MAX: none yet).
    slot_of_record: Vec<u32>,
    globals: &'a Globals,
}

/// Gives up on the current pickle (see the module docs).
macro_rules! bail {
    () => {
        return Ok(None)
    };
}

/// Unwraps an `Option`, giving up on `None`.
macro_rules! need {
    ($e:expr) => {
        match $e {
            Some(v) => v,
            None => return Ok(None),
        }
    };
}

impl<'py, 'a, B: TensorBuilder> Machine<'py, 'a, B> {
    /// The Python object for a value; `None` for values that have none (a storage or
    /// a rebuild function outside a rebuild), which ends the run.
    fn object(&self, v: &Value) -> PyResult<Option<Bound<'py, PyAny>>> {
        self.object_at(v, 0)
    }

    /// `object` for a value nested `depth` lazy tuples deep. Making a tuple recurses
    /// into its items, so pickles nesting tuples deeper than a state dict ever does
    /// go to Python's unpickler (which builds them without recursion) rather than
    /// deep into this thread's stack.
    fn object_at(&self, v: &Value, depth: usize) -> PyResult<Option<Bound<'py, PyAny>>> {
        const MAX_DEPTH: usize = 256;
        let py = self.py;
        Ok(Some(match v {
            Value::Obj(o) => o.bind(py).clone(),
            Value::Int(i) => i.into_pyobject(py)?.into_any(),
            Value::Str(i) => {
                let s = &self.strings[*i];
                if let Some(o) = s.obj.get() {
                    return Ok(Some(o.bind(py).clone()));
                }
                let o = PyString::new(py, need!(self.str_at(*i))).into_any();
                s.obj.get_or_init(|| o.clone().unbind());
                o
            }
            Value::Tuple(i) => {
                let t = &self.tuples[*i];
                if let Some(o) = t.obj.get() {
                    return Ok(Some(o.bind(py).clone()));
                }
                if depth >= MAX_DEPTH {
                    return Ok(None);
                }
                let mut items = Vec::with_capacity(t.len);
                for item in &self.items[t.start..t.start + t.len] {
                    items.push(need!(self.object_at(item, depth + 1)?));
                }
                let o = PyTuple::new(py, items)?.into_any();
                t.obj.get_or_init(|| o.clone().unbind());
                o
            }
            Value::EmptyOrderedDict(i) => {
                let cell = &self.ordered_dicts[*i];
                if let Some(o) = cell.get() {
                    return Ok(Some(o.bind(py).clone()));
                }
                let o = self.globals.ordered_dict.bind(py).call0()?;
                cell.get_or_init(|| o.clone().unbind());
                o
            }
            Value::Native(_) | Value::Storage(_) => return Ok(None),
        }))
    }

    /// The stack floor: the last MARK, below which nothing may be popped.
    fn floor(&self) -> usize {
        self.marks.last().copied().unwrap_or(0)
    }

    fn pop(&mut self) -> Option<Value> {
        if self.stack.len() <= self.floor() {
            return None;
        }
        self.stack.pop()
    }

    fn pop_obj(&mut self) -> PyResult<Option<Bound<'py, PyAny>>> {
        let v = need!(self.pop());
        self.object(&v)
    }

    fn top_obj(&self) -> PyResult<Option<Bound<'py, PyAny>>> {
        if self.stack.len() <= self.floor() {
            return Ok(None);
        }
        self.object(need!(self.stack.last()))
    }

    /// Pops everything above the last MARK.
    fn pop_mark(&mut self) -> Option<Vec<Value>> {
        let k = self.marks.pop()?;
        Some(self.stack.split_off(k))
    }

    fn push_obj(&mut self, o: Bound<'py, PyAny>) {
        self.stack.push(Value::Obj(o.unbind()));
    }

    /// Makes the stack values from `from` up into a tuple, in place of them.
    fn tuple_from(&mut self, from: usize) {
        let start = self.items.len();
        self.items.extend(self.stack.drain(from..));
        self.tuples.push(LazyTuple {
            start,
            len: self.items.len() - start,
            obj: OnceCell::new(),
            shared: false,
        });
        self.stack.push(Value::Tuple(self.tuples.len() - 1));
    }

    /// Lets go of a value popped for good (a persistent id, a rebuild's arguments, a
    /// dict's key). A tuple or string that was never memoized has no other
    /// reference; when it is also the last of its arena its entry is dropped, with
    /// the nested ones that were last before it. The arenas then stay small and in
    /// cache for pickles that memoize little (fastserial's own: tens of bytes per
    /// tensor instead of hundreds of fresh memory).
    fn release(&mut self, v: Value) {
        let mut work = std::mem::take(&mut self.released);
        work.push(v);
        while let Some(v) = work.pop() {
            match v {
                Value::Tuple(i) if i + 1 == self.tuples.len() && !self.tuples[i].shared => {
                    let t = self.tuples.pop().expect("i is the last tuple");
                    // The last tuple's items are the items arena's tail; its nested
                    // values were made before it, so they are released last-first.
                    work.extend(self.items.drain(t.start..));
                }
                Value::Str(i) if i + 1 == self.strings.len() && !self.strings[i].shared => {
                    self.strings.pop();
                }
                _ => {}
            }
        }
        self.released = work;
    }

    /// A tuple's items.
    fn items_of(&self, v: &Value) -> Option<&[Value]> {
        let Value::Tuple(i) = v else {
            return None;
        };
        let t = &self.tuples[*i];
        Some(&self.items[t.start..t.start + t.len])
    }

    /// PUT / MEMOIZE: memoizes the top of the stack, which must lie above the last
    /// MARK (as in `_pickle`).
    fn put(&mut self, idx: u64) -> Option<()> {
        // Indices beyond the pickle's length cannot come from a real pickler.
        if idx > self.cur.data.len() as u64 || self.stack.len() <= self.floor() {
            return None;
        }
        let kept = match &self.globals.memo_read {
            Some(bits) => bits
                .get((idx / 8) as usize)
                .is_some_and(|b| b & (1 << (idx % 8)) != 0),
            None => true,
        };
        let idx = idx as usize;
        // Which keys are set, a bit each (what MEMOIZE numbers the next one by).
        if self.memo_set.len() <= idx / 64 {
            self.memo_set.resize(idx / 64 + 1, 0);
        }
        let bit = 1u64 << (idx % 64);
        if self.memo_set[idx / 64] & bit == 0 {
            self.memo_set[idx / 64] |= bit;
            self.memo_len += 1;
        }
        if !kept {
            // No GET reads this key: keep nothing, so the value keeps one reference
            // and its arena entry can be let go of (`release`).
            self.memo.remove(&idx);
            return Some(());
        }
        let top = self.stack.last()?.clone_ref(self.py);
        match top {
            Value::Tuple(i) => self.tuples[i].shared = true,
            Value::Str(i) => self.strings[i].shared = true,
            _ => {}
        }
        self.memo.insert(idx, top);
        Some(())
    }

    /// GET: a kept key's value. A key that is unset, or set but not kept (the scan
    /// said no GET reads it), ends the run.
    fn get(&mut self, idx: u64) -> Option<()> {
        let v = self
            .memo
            .get(&usize::try_from(idx).ok()?)?
            .clone_ref(self.py);
        self.stack.push(v);
        Some(())
    }

    fn tuple(&mut self, n: usize) -> Option<()> {
        if self.stack.len() < self.floor() + n {
            return None;
        }
        self.tuple_from(self.stack.len() - n);
        Some(())
    }

    fn string(&mut self, n: usize) -> Option<()> {
        let start = self.cur.pos;
        let b = self.cur.take(n)?;
        // Python's unpickler decodes with 'surrogatepass'; plain UTF-8 covers real
        // state dicts, and anything else goes to it.
        std::str::from_utf8(b).ok()?;
        self.strings.push(LazyStr {
            start,
            len: n,
            obj: OnceCell::new(),
            shared: false,
        });
        self.stack.push(Value::Str(self.strings.len() - 1));
        Some(())
    }

    /// The text of string `i` (`None` only if it were not UTF-8, which `string`
    /// checked).
    fn str_at(&self, i: usize) -> Option<&'a str> {
        let s = &self.strings[i];
        std::str::from_utf8(self.cur.data.get(s.start..s.start + s.len)?).ok()
    }

    /// Whether `v` is the string (or bytes) `text`, without making a Python object.
    fn text_is(&self, v: &Value, text: &str) -> bool {
        match v {
            Value::Str(i) => self.str_at(*i) == Some(text),
            Value::Obj(o) => text_of(o.bind(self.py)).as_deref() == Some(text),
            _ => false,
        }
    }

    fn global(&mut self, module: String, name: String) -> Option<()> {
        let key = (module, name);
        if let Some(&n) = self.globals.natives.get(&key) {
            self.stack.push(Value::Native(n));
        } else {
            let o = self.globals.objects.get(&key)?;
            self.stack.push(Value::Obj(o.clone_ref(self.py)));
        }
        Some(())
    }

    fn run(&mut self, builder: &mut B) -> PyResult<Option<Py<PyAny>>> {
        let py = self.py;
        loop {
            let code = need!(self.cur.u8());
            match code {
                op::PROTO => {
                    if need!(self.cur.u8()) > 5 {
                        bail!();
                    }
                }
                op::FRAME => {
                    // a length prefix, which must not promise more than is left
                    let n = need!(self.cur.le(8));
                    if n > (self.cur.data.len() - self.cur.pos) as u64 {
                        bail!();
                    }
                }
                op::STOP => {
                    let v = need!(self.pop_obj()?);
                    return Ok(Some(v.unbind()));
                }
                op::MARK => self.marks.push(self.stack.len()),
                op::EMPTY_DICT => self.push_obj(PyDict::new(py).into_any()),
                op::EMPTY_LIST => self.push_obj(PyList::empty(py).into_any()),
                op::EMPTY_TUPLE => self.tuple_from(self.stack.len()),
                op::NONE => self.push_obj(py.None().into_bound(py)),
                op::NEWTRUE => self.push_obj(true.into_pyobject(py)?.to_owned().into_any()),
                op::NEWFALSE => self.push_obj(false.into_pyobject(py)?.to_owned().into_any()),
                op::TUPLE => {
                    let k = need!(self.marks.pop());
                    self.tuple_from(k);
                }
                op::TUPLE1 => need!(self.tuple(1)),
                op::TUPLE2 => need!(self.tuple(2)),
                op::TUPLE3 => need!(self.tuple(3)),
                op::BINPUT => {
                    let i = need!(self.cur.le(1));
                    need!(self.put(i));
                }
                op::LONG_BINPUT => {
                    let i = need!(self.cur.le(4));
                    need!(self.put(i));
                }
                op::MEMOIZE => {
                    // MEMOIZE's key is the number of memo entries, as in `_pickle`.
                    let i = self.memo_len as u64;
                    need!(self.put(i));
                }
                op::BINGET => {
                    let i = need!(self.cur.le(1));
                    need!(self.get(i));
                }
                op::LONG_BINGET => {
                    let i = need!(self.cur.le(4));
                    need!(self.get(i));
                }
                op::SHORT_BINUNICODE => {
                    let n = need!(self.cur.le(1)) as usize;
                    need!(self.string(n));
                }
                op::BINUNICODE => {
                    let n = need!(self.cur.le(4)) as usize;
                    need!(self.string(n));
                }
                op::BINUNICODE8 => {
                    let n = need!(usize::try_from(need!(self.cur.le(8))).ok());
                    need!(self.string(n));
                }
                op::SHORT_BINBYTES | op::BINBYTES | op::BINBYTES8 => {
                    let width = match code {
                        op::SHORT_BINBYTES => 1,
                        op::BINBYTES => 4,
                        _ => 8,
                    };
                    let n = need!(usize::try_from(need!(self.cur.le(width))).ok());
                    let b = need!(self.cur.take(n));
                    self.push_obj(PyBytes::new(py, b).into_any());
                }
                op::BININT1 => {
                    let v = need!(self.cur.le(1)) as i64;
                    self.stack.push(Value::Int(v));
                }
                op::BININT2 => {
                    let v = need!(self.cur.le(2)) as i64;
                    self.stack.push(Value::Int(v));
                }
                op::BININT => {
                    let v = need!(self.cur.le(4)) as u32 as i32 as i64;
                    self.stack.push(Value::Int(v));
                }
                op::LONG1 => {
                    // little-endian two's complement, up to 8 bytes here
                    let n = need!(self.cur.u8()) as usize;
                    if n > 8 {
                        bail!();
                    }
                    let b = need!(self.cur.take(n));
                    let mut v = [0u8; 8];
                    v[..n].copy_from_slice(b);
                    if n > 0 && n < 8 && b[n - 1] & 0x80 != 0 {
                        v[n..].fill(0xff);
                    }
                    self.stack.push(Value::Int(i64::from_le_bytes(v)));
                }
                op::BINFLOAT => {
                    let b = need!(self.cur.take(8));
                    let v = f64::from_be_bytes(b.try_into().expect("8 bytes"));
                    self.push_obj(PyFloat::new(py, v).into_any());
                }
                op::SETITEM => {
                    let v = need!(self.pop_obj()?);
                    let k = need!(self.pop_obj()?);
                    need!(self.top_obj()?).set_item(k, v)?;
                }
                op::SETITEMS => {
                    let items = need!(self.pop_mark());
                    if items.len() % 2 != 0 {
                        bail!();
                    }
                    let d = need!(self.top_obj()?);
                    for kv in items.chunks_exact(2) {
                        let k = need!(self.object(&kv[0])?);
                        let v = need!(self.object(&kv[1])?);
                        d.set_item(k, v)?;
                    }
                    for v in items.into_iter().rev() {
                        self.release(v);
                    }
                }
                op::APPEND => {
                    let v = need!(self.pop_obj()?);
                    let l = need!(self.top_obj()?);
                    need!(l.downcast_exact::<PyList>().ok()).append(v)?;
                }
                op::APPENDS => {
                    let items = need!(self.pop_mark());
                    let l = need!(self.top_obj()?);
                    let l = need!(l.downcast_exact::<PyList>().ok());
                    for v in &items {
                        l.append(need!(self.object(v)?))?;
                    }
                }
                op::GLOBAL => {
                    let module = need!(self.cur.line()).to_string();
                    let name = need!(self.cur.line()).to_string();
                    need!(self.global(module, name));
                }
                op::STACK_GLOBAL => {
                    let name = need!(self.pop_obj()?);
                    let module = need!(self.pop_obj()?);
                    let name = need!(name.downcast::<PyString>().ok())
                        .to_str()?
                        .to_string();
                    let module = need!(module.downcast::<PyString>().ok())
                        .to_str()?
                        .to_string();
                    need!(self.global(module, name));
                }
                op::BINPERSID => {
                    let pid = need!(self.pop());
                    let slot = need!(self.storage(builder, &pid)?);
                    self.release(pid);
                    self.stack.push(Value::Storage(slot));
                }
                op::REDUCE => {
                    let args = need!(self.pop());
                    let callable = need!(self.pop());
                    let result = need!(self.reduce(builder, callable, args)?);
                    self.stack.push(result);
                }
                op::BUILD => {
                    // Only attribute state on an OrderedDict (a state dict's
                    // `_metadata`), set through its __dict__ as `_pickle` does.
                    let state = need!(self.pop_obj()?);
                    let inst = need!(self.top_obj()?);
                    if !inst.get_type().is(self.globals.ordered_dict.bind(py)) {
                        bail!();
                    }
                    let state = need!(state.downcast_exact::<PyDict>().ok()).clone();
                    if inst.hasattr(pyo3::intern!(py, "__setstate__"))? {
                        bail!();
                    }
                    let dict = inst.getattr(pyo3::intern!(py, "__dict__"))?;
                    for (k, v) in state.iter() {
                        dict.set_item(k, v)?;
                    }
                }
                _ => bail!(),
            }
        }
    }

    /// BINPERSID: the builder's slot for `('storage', type, key, location, numel)`,
    /// shared by every id with the same key (as torch's loader shares storages).
    /// The key and strings are read in place: no Python object is made for them.
    fn storage(&mut self, builder: &mut B, pid: &Value) -> PyResult<Option<usize>> {
        let py = self.py;
        let Some(items) = self.items_of(pid) else {
            return Ok(None);
        };
        if items.len() != 5 || !self.text_is(&items[0], "storage") {
            return Ok(None);
        }
        let cpu = self.text_is(&items[3], "cpu");
        let numel = match &items[4] {
            Value::Int(n) => u64::try_from(*n).ok(),
            v => need!(self.object(v)?).extract::<u64>().ok(),
        };
        let Some(numel) = numel else {
            return Ok(None);
        };
        let record = match &items[2] {
            Value::Str(i) => builder.record_of(need!(self.str_at(*i))),
            Value::Obj(o) => match o.bind(py).downcast::<PyString>() {
                Ok(key) => builder.record_of(key.to_str()?),
                Err(_) => None,
            },
            _ => None,
        };
        let Some(record) = record else {
            return Ok(None);
        };
        let storage_type = need!(self.object(&items[1])?);
        if self.slot_of_record.is_empty() {
            self.slot_of_record = vec![u32::MAX; builder.record_count()];
        }
        if let Some(&i) = self.slot_of_record.get(record).filter(|&&i| i != u32::MAX) {
            let i = i as usize;
            if builder.slot_has_type(&self.slots[i], &storage_type) {
                return Ok(Some(i));
            }
            // The key met again under another storage class (an empty storage viewed
            // with two dtypes): what torch.load hands back (`TensorBuilder::retyped`).
            return match builder.retyped(py, &mut self.slots[i], &storage_type, numel)? {
                Retyped::Same => Ok(Some(i)),
                Retyped::Shared(slot) => {
                    self.slots.push(slot);
                    Ok(Some(self.slots.len() - 1))
                }
                Retyped::Python => Ok(None),
            };
        }
        let Some(slot) = builder.slot_for(py, &storage_type, cpu, numel, record)? else {
            return Ok(None);
        };
        self.slots.push(slot);
        self.slot_of_record[record] = (self.slots.len() - 1) as u32;
        Ok(Some(self.slots.len() - 1))
    }

    /// REDUCE: a tensor rebuild natively, `OrderedDict()` lazily, other callables
    /// (the caller's resolved globals) through Python.
    fn reduce(&mut self, builder: &mut B, callable: Value, args: Value) -> PyResult<Option<Value>> {
        let py = self.py;
        match callable {
            Value::Native(kind) => {
                let Value::Tuple(args) = args else {
                    return Ok(None);
                };
                let t = need!(self.rebuild(builder, kind, args)?);
                self.release(Value::Tuple(args));
                Ok(Some(Value::Obj(t)))
            }
            Value::Obj(f) => {
                let f = f.into_bound(py);
                let empty = self.items_of(&args).is_some_and(|a| a.is_empty());
                if empty && f.is(self.globals.ordered_dict.bind(py)) {
                    self.ordered_dicts.push(OnceCell::new());
                    return Ok(Some(Value::EmptyOrderedDict(self.ordered_dicts.len() - 1)));
                }
                let args = need!(self.object(&args)?);
                let args = need!(args.downcast_exact::<PyTuple>().ok()).clone();
                Ok(Some(Value::Obj(f.call1(args)?.unbind())))
            }
            _ => Ok(None),
        }
    }

    /// `_rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks[, metadata])`
    /// or v3 (with a dtype before the metadata), on a builder's slot.
    fn rebuild(
        &mut self,
        builder: &mut B,
        kind: Native,
        args: usize,
    ) -> PyResult<Option<Py<PyAny>>> {
        let (start, len) = (self.tuples[args].start, self.tuples[args].len);
        let a = &self.items[start..start + len];
        let fixed = match kind {
            Native::RebuildV2 => 6,
            Native::RebuildV3 => 7,
        };
        if a.len() != fixed && a.len() != fixed + 1 {
            return Ok(None);
        }
        let Value::Storage(slot) = a[0] else {
            return Ok(None);
        };
        let Value::Int(offset) = a[1] else {
            return Ok(None);
        };
        let (Some(size), Some(stride)) = (self.ints(&a[2]), self.ints(&a[3])) else {
            return Ok(None);
        };
        // torch pickles a bool; anything else goes to the Python rebuild, which
        // refuses it with a typed error.
        let requires_grad = need!(self.object(&a[4])?);
        let Ok(requires_grad) = requires_grad.downcast::<pyo3::types::PyBool>() else {
            return Ok(None);
        };
        let requires_grad = requires_grad.is_true();
        // An empty OrderedDict of hooks that nothing else took is never made.
        let hooks = match &a[5] {
            Value::EmptyOrderedDict(i) if self.ordered_dicts[*i].get().is_none() => None,
            v => Some(need!(self.object(v)?)),
        };
        let dtype = match kind {
            Native::RebuildV3 => need!(self.object(&a[6])?),
            Native::RebuildV2 => builder.slot_dtype(self.py, &self.slots[slot]),
        };
        let metadata = match a.get(fixed) {
            Some(v) => Some(need!(self.object(v)?)),
            None => None,
        };
        let view = View {
            offset,
            size: &size,
            stride: &stride,
        };
        let extras = Extras {
            requires_grad,
            hooks: hooks.as_ref(),
            metadata: metadata.as_ref(),
        };
        builder.build(self.py, &mut self.slots[slot], &dtype, &view, &extras)
    }

    /// A tuple of small ints (a size or stride) as a vector.
    fn ints(&self, v: &Value) -> Option<Vec<i64>> {
        self.items_of(v)?
            .iter()
            .map(|i| match i {
                Value::Int(n) => Some(*n),
                _ => None,
            })
            .collect()
    }
}
