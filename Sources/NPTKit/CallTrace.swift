import CNPTKit
import NPTCore
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

// MARK: the signature table (CallTable.generated.swift fills it from include/nptkit.h)

/// How the tracer records a parameter and the replayer rebuilds it (scripts/gen-call-table.py
/// classifies every parameter of the header into one of these).
package enum CallParamKind: UInt8, Sendable {
    case u32, i32, u64, i64, size          // by value
    case handle                            // npt_context / npt_vm / npt_vcpu *: a stable id
    case handleOut                         // T **: the handle the call made
    case string                            // const char *
    case stringOut                         // const char **: the string's contents
    case bytesIn                           // const void *, length = countParam
    case bytesOut                          // void *, capacity = countParam, written = filledParam or all
    case u32Out, i32Out, u64Out, i64Out, sizeOut // T *: the value before and after
    case structIn                          // const T *: bytes up to its size, its pointer members
    case structInOut                       // T *: the same before, and after the call
    case arrayIn                           // const T *, count = countParam
    case arrayOut                          // T *, capacity = countParam, written = *filledParam
    case callback                          // a C function: its name, and every call the library made of it
    case userData                          // the callback's void *: not replayed
    case opsTable                          // npt_backend_ops: the functions' names (not replayable)
}

package enum CallResultKind: UInt8, Sendable { case status, string, u32 }

package struct CallPointer: Sendable {
    package enum Kind: UInt8, Sendable { case string, bytes }
    package let kind: Kind
    package let offset: Int
    /// For `.bytes`: the offset of its size_t length member.
    package let lengthOffset: Int
}

package struct CallStruct: Sendable {
    package let name: String
    package let size: Int
    /// Its size in the oldest published header that has it (Tests/C/abi/*): the smallest `size` accepted.
    package let firstSize: Int
    /// Starts with `uint32_t size`.
    package let versioned: Bool
    package let pointers: [CallPointer]
    /// Offsets of its uint64_t durations (members named *_ns*): not compared on replay.
    package let timeOffsets: [Int]
}

package struct CallParam: Sendable {
    package let name: String
    package let kind: CallParamKind
    package let structIndex: Int
    package let countParam: Int
    package let filledParam: Int
}

package struct CallFunction: Sendable {
    package let name: String
    package let result: CallResultKind
    package let params: [CallParam]
}

package enum CallTable {}

// MARK: the trace file

/// The call-trace format (little-endian; docs in README "Call tracing"):
///   file   = "NPTCALLS" u32 formatVersion u32 abiVersion u64 tableFingerprint, then records
///   record = u32 length (whole record) u16 function (CallID) u16 thread u64 sequence i64 result,
///            then for every parameter its input, then for every parameter its output, then the
///            result string (string results) and the npt_last_error() of a failed call
///   blob   = u32 length (0xFFFFFFFF: NULL pointer) + bytes; a string is a blob without its NUL
/// Each thread records into a buffer of its own, written to the file in blocks: the records of one
/// thread are in its order, those of different threads interleave by block. The sequence number
/// (one counter per process, taken as the call returns) gives the order the calls returned in;
/// the replayer sorts by it.
package enum CallTraceFormat {
    package static let magic: [UInt8] = Array("NPTCALLS".utf8)
    package static let version: UInt32 = 2
    package static let headerSize = 24
    package static let recordHeaderSize = 24
    package static let absent: UInt32 = 0xFFFF_FFFF
    /// The most bytes recorded of one buffer or struct (a larger one is a caller error the library refuses anyway).
    package static let maxBlob = 1 << 30
}

/// An export's arguments as the 64-bit values the tracer records, inline: the array literal an
/// export passes to `api`/`traced` compiles to stores into this (no array, no allocation).
struct CallArgs: ExpressibleByArrayLiteral {
    static let capacity = 8
    private var values: (UInt64, UInt64, UInt64, UInt64, UInt64, UInt64, UInt64, UInt64) = (0, 0, 0, 0, 0, 0, 0, 0)
    let count: Int
    @inline(__always)
    init(arrayLiteral elements: UInt64...) {
        precondition(elements.count <= Self.capacity, "CallArgs: more than \(Self.capacity) arguments")
        count = elements.count
        withUnsafeMutableBytes(of: &values) { b in
            for (i, e) in elements.enumerated() { b.storeBytes(of: e, toByteOffset: i * 8, as: UInt64.self) }
        }
    }
    @inline(__always)
    subscript(i: Int) -> UInt64 { withUnsafeBytes(of: values) { $0.load(fromByteOffset: i * 8, as: UInt64.self) } }
    /// All 8 values to `p` (the tracer indexes them there: a tuple indexed by a variable is a copy or a jump table).
    @inline(__always)
    func store(to p: UnsafeMutablePointer<UInt64>) {
        p[0] = values.0; p[1] = values.1; p[2] = values.2; p[3] = values.3
        p[4] = values.4; p[5] = values.5; p[6] = values.6; p[7] = values.7
    }
}

/// The signature table in the form the tracer reads per call: flat, trivial values (no strings,
/// no arrays, so no reference counting), built once from `CallTable`.
struct CompactCallTable: @unchecked Sendable {
    struct Function { var first: Int32; var count: Int32; var result: CallResultKind }
    struct Param { var kind: CallParamKind; var structIndex: Int16; var countParam: Int8; var filledParam: Int8 }
    struct Struct { var size: Int32; var firstPointer: Int32; var pointerCount: Int32; var versioned: Bool }
    struct Pointer { var kind: CallPointer.Kind; var offset: Int32; var lengthOffset: Int32 }
    let functions: UnsafeMutablePointer<Function>
    let params: UnsafeMutablePointer<Param>
    let structs: UnsafeMutablePointer<Struct>
    let pointers: UnsafeMutablePointer<Pointer>

    static let shared = CompactCallTable()

    private init() {
        let fs = CallTable.functions, ss = CallTable.structs
        functions = .allocate(capacity: max(fs.count, 1))
        params = .allocate(capacity: max(fs.reduce(0) { $0 + $1.params.count }, 1))
        structs = .allocate(capacity: max(ss.count, 1))
        pointers = .allocate(capacity: max(ss.reduce(0) { $0 + $1.pointers.count }, 1))
        var p = 0
        for (i, f) in fs.enumerated() {
            functions[i] = Function(first: Int32(p), count: Int32(f.params.count), result: f.result)
            for q in f.params {
                params[p] = Param(kind: q.kind, structIndex: Int16(q.structIndex), countParam: Int8(q.countParam),
                                  filledParam: Int8(q.filledParam))
                p += 1
            }
        }
        var m = 0
        for (i, s) in ss.enumerated() {
            structs[i] = Struct(size: Int32(s.size), firstPointer: Int32(m), pointerCount: Int32(s.pointers.count), versioned: s.versioned)
            for q in s.pointers {
                pointers[m] = Pointer(kind: q.kind, offset: Int32(q.offset), lengthOffset: Int32(q.lengthOffset))
                m += 1
            }
        }
    }
}

/// One thread's recording state and its buffer of records.
///
/// The buffer holds whole records in [0, committed) (`committed` is published with a release store
/// once a record is complete), of which [flushed, committed) is not in the file yet, then the record
/// being built in [start, used). The owning thread writes past `committed` only; whoever writes the
/// file (any thread, under the sink's lock) reads [flushed, committed) only and moves `flushed`. The
/// owner empties or grows the buffer only under that lock. So a call takes no lock and allocates
/// nothing unless its buffer is full.
struct CallThreadBuffer: ~Copyable {
    var base: UnsafeMutableRawPointer
    var capacity: Int
    let committed = Atomic<Int>(0)
    var flushed = 0        // under the sink's lock
    var start = 0
    var used = 0
    /// Calls a callback makes back into the library are not recorded (the replayer's stand-in makes none).
    var depth = 0
    var id: UInt16 = 0
    /// The Sink it is registered with (its Unmanaged bits), 0 for none.
    var sink: UInt = 0
    /// The calls the library made of the caller's callback during the current call: their arguments.
    var callbackArgs: UnsafeMutablePointer<UInt64>
    var callbackCapacity: Int
    var callbackValues = 0
    var callbackCalls: UInt32 = 0
    /// CompactCallTable.shared, kept here so that a call reads no global that needs initializing.
    let table = CompactCallTable.shared
    /// The current call's arguments (CallArgs.capacity).
    let args = UnsafeMutablePointer<UInt64>.allocate(capacity: CallArgs.capacity)

    static let initialCapacity = 64 << 10

    init() {
        capacity = Self.initialCapacity
        base = .allocate(byteCount: capacity, alignment: 16)
        callbackCapacity = 256
        callbackArgs = .allocate(capacity: callbackCapacity)
    }
    deinit {
        base.deallocate()
        callbackArgs.deallocate()
        args.deallocate()
    }
}

/// Writes one record into its thread's buffer. Its position and the buffer's bounds are its own
/// (registers, not the buffer's fields, while the record is built): `finish` stores them back.
struct CallRecorder {
    let t: UnsafeMutablePointer<CallThreadBuffer>
    private var base: UnsafeMutableRawPointer
    private var at: Int
    private var end: Int

    @inline(__always)
    init(_ t: UnsafeMutablePointer<CallThreadBuffer>) {
        self.t = t
        base = t.pointee.base
        at = t.pointee.used
        end = t.pointee.capacity
    }
    @inline(__always)
    private mutating func room(_ n: Int) -> UnsafeMutableRawPointer {
        if at + n > end { grow(n) }
        let p = base + at
        at += n
        return p
    }
    @inline(never)
    private mutating func grow(_ n: Int) {
        t.pointee.used = at
        CallTrace.makeRoom(t, n)
        base = t.pointee.base
        at = t.pointee.used
        end = t.pointee.capacity
    }
    /// The record's end, back into the buffer's state.
    @inline(__always) func finish() { t.pointee.used = at }
    @inline(__always) mutating func skip(_ n: Int) { _ = room(n) }
    @inline(__always) mutating func u8(_ v: UInt8) { room(1).storeBytes(of: v, as: UInt8.self) }
    @inline(__always) mutating func u32(_ v: UInt32) { room(4).storeBytes(of: v.littleEndian, as: UInt32.self) }
    @inline(__always) mutating func u64(_ v: UInt64) { room(8).storeBytes(of: v.littleEndian, as: UInt64.self) }
    mutating func blob(_ p: UnsafeRawPointer?, _ n: Int) {
        guard let p, n >= 0, n <= CallTraceFormat.maxBlob else { u32(CallTraceFormat.absent); return }
        u32(UInt32(n))
        if n > 0 { room(n).copyMemory(from: p, byteCount: n) }
    }
    mutating func string(_ p: UnsafePointer<CChar>?) {
        guard let p else { u32(CallTraceFormat.absent); return }
        blob(p, strlen(p))
    }
}

/// The call tracer: on when NPTKIT_CALL_TRACE names a file (read once, at the first call).
enum CallTrace {
    /// 0: NPTKIT_CALL_TRACE not read yet; 1: tracing off; else the Sink (retained for the process).
    static let current = Atomic<UInt>(0)
    /// The calls' order across threads (the records' sequence numbers).
    static let sequence = Atomic<UInt64>(0)
    private static let startLock = NPTMutex(())

    static func sink(_ v: UInt) -> Sink { Unmanaged<Sink>.fromOpaque(UnsafeRawPointer(bitPattern: v)!).takeUnretainedValue() }

    /// The open trace, or nil (tracing off). The first call reads NPTKIT_CALL_TRACE.
    static var sink: Sink? {
        let v = current.load(ordering: .acquiring)
        if v == 1 { return nil }
        if v == 0 { return fromEnvironment() == 1 ? nil : sink(current.load(ordering: .acquiring)) }
        return sink(v)
    }

    /// Reads NPTKIT_CALL_TRACE once; returns `current` afterwards.
    static func fromEnvironment() -> UInt {
        startLock.withLock { _ in
            if current.load(ordering: .acquiring) == 0 {
                var sink: Sink?
                if let path = getenv("NPTKIT_CALL_TRACE"), path.pointee != 0 {
                    do throws(NPTError) { sink = try Sink(path: String(cString: path)) } catch {
                        let message = "nptkit: NPTKIT_CALL_TRACE: \(error.message); calls are not traced\n"
                        _ = message.withCString { Glibc.write(2, $0, strlen($0)) }
                    }
                }
                install(sink)
                atexit { CallTrace.sink?.flush() }
            }
        }
        return current.load(ordering: .acquiring)
    }

    private static func install(_ sink: Sink?) {
        current.store(sink.map { UInt(bitPattern: Unmanaged.passRetained($0).toOpaque()) } ?? 1, ordering: .releasing)
    }

    /// Starts tracing into `path` (replacing NPTKIT_CALL_TRACE's trace, which is written out and closed first).
    static func start(path: String) throws(NPTError) {
        let s = try Sink(path: path)
        _ = sink // the environment is read first, so it cannot start a trace later
        startLock.withLock { _ in sink?.close(); install(s) }
    }

    /// Writes out and closes the trace (a record a call in flight completes later is dropped).
    static func stop() {
        _ = sink
        startLock.withLock { _ in sink?.close(); install(nil) }
    }

    final class Sink: @unchecked Sendable {
        struct State {
            /// The registered threads' buffers (their addresses).
            var threads: [UInt] = []
            var nextThread = 0
            var closed = false
        }
        let state = NPTMutex(State())
        private let fd: Int32
        init(path: String) throws(NPTError) {
            fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
            guard fd >= 0 else { throw .invalid("cannot open \(path) for the call trace: \(String(cString: strerror(errno)))") }
            var header = CallTraceFormat.magic
            withUnsafeBytes(of: CallTraceFormat.version.littleEndian) { header.append(contentsOf: $0) }
            withUnsafeBytes(of: NPTABI.version.littleEndian) { header.append(contentsOf: $0) }
            withUnsafeBytes(of: CallTable.fingerprint.littleEndian) { header.append(contentsOf: $0) }
            header.withUnsafeBytes { write($0.baseAddress!, $0.count) }
        }

        /// Writes every thread's complete records out (and fsync).
        func flush() {
            state.withLock { s in
                guard !s.closed else { return }
                for t in s.threads { writeOut(UnsafeMutablePointer(bitPattern: t)!, s.closed) }
                _ = fsync(fd)
            }
        }
        func close() {
            state.withLock { s in
                guard !s.closed else { return }
                for t in s.threads { writeOut(UnsafeMutablePointer(bitPattern: t)!, s.closed) }
                _ = fsync(fd)
                _ = Glibc.close(fd)
                s.closed = true
            }
        }

        /// [flushed, committed) of `t` to the file (nothing once closed). Under the lock.
        func writeOut(_ t: UnsafeMutablePointer<CallThreadBuffer>, _ closed: Bool) {
            let c = t.pointee.committed.load(ordering: .acquiring)
            if c > t.pointee.flushed, !closed { write(t.pointee.base + t.pointee.flushed, c - t.pointee.flushed) }
            t.pointee.flushed = c
        }

        private func write(_ p: UnsafeRawPointer, _ count: Int) {
            var off = 0
            while off < count {
                let n = Glibc.write(fd, p + off, count - off)
                if n <= 0 { if n < 0 && errno == EINTR { continue }; break }
                off += n
            }
        }
    }

    /// The pthread key of the threads' buffers, plus 1 (0: not made yet). An atomic rather than a
    /// lazily initialized global: reading it needs no swift_once per call.
    private static let keySlot = Atomic<UInt>(0)
    private static let keyMade: pthread_key_t = {
        var k = pthread_key_t()
        pthread_key_create(&k) { p in
            guard let p else { return }
            let t = p.assumingMemoryBound(to: CallThreadBuffer.self)
            CallTrace.detach(t)
            t.deinitialize(count: 1)
            t.deallocate()
        }
        keySlot.store(UInt(k) + 1, ordering: .releasing)
        return k
    }()

    @inline(__always)
    static func threadBuffer() -> UnsafeMutablePointer<CallThreadBuffer> {
        let k = keySlot.load(ordering: .acquiring)
        if k != 0, let p = pthread_getspecific(pthread_key_t(k - 1)) { return p.assumingMemoryBound(to: CallThreadBuffer.self) }
        return newThreadBuffer()
    }
    @inline(never)
    private static func newThreadBuffer() -> UnsafeMutablePointer<CallThreadBuffer> {
        let t = UnsafeMutablePointer<CallThreadBuffer>.allocate(capacity: 1)
        t.initialize(to: CallThreadBuffer())
        pthread_setspecific(keyMade, t)
        return t
    }

    /// Registers `t` with the trace `v` (leaving the one it was registered with: its records are
    /// written out to that trace first).
    @inline(never)
    static func attach(_ t: UnsafeMutablePointer<CallThreadBuffer>, _ v: UInt) {
        detach(t)
        sink(v).state.withLock { s in
            s.threads.append(UInt(bitPattern: t))
            s.nextThread += 1
            t.pointee.id = UInt16(truncatingIfNeeded: s.nextThread)
        }
        t.pointee.sink = v
    }

    static func detach(_ t: UnsafeMutablePointer<CallThreadBuffer>) {
        guard t.pointee.sink != 0 else { return }
        let s = sink(t.pointee.sink)
        s.state.withLock { st in
            s.writeOut(t, st.closed)
            st.threads.removeAll { $0 == UInt(bitPattern: t) }
            t.pointee.committed.store(0, ordering: .releasing)
            t.pointee.flushed = 0
            t.pointee.start = 0
            t.pointee.used = 0
        }
        t.pointee.sink = 0
    }

    /// The buffer of `t` lacks `n` bytes: its complete records go to the file, the record being
    /// built moves to the front, and the buffer grows if that is still not enough.
    @inline(never)
    static func makeRoom(_ t: UnsafeMutablePointer<CallThreadBuffer>, _ n: Int) {
        let s = sink(t.pointee.sink)
        s.state.withLock { st in
            s.writeOut(t, st.closed)
            let partial = t.pointee.used - t.pointee.start
            if t.pointee.start > 0 { t.pointee.base.copyMemory(from: t.pointee.base + t.pointee.start, byteCount: partial) }
            t.pointee.start = 0
            t.pointee.used = partial
            t.pointee.flushed = 0
            t.pointee.committed.store(0, ordering: .releasing)
            if partial + n > t.pointee.capacity {
                var c = t.pointee.capacity
                while c < partial + n { c *= 2 }
                let b = UnsafeMutableRawPointer.allocate(byteCount: c, alignment: 16)
                b.copyMemory(from: t.pointee.base, byteCount: partial)
                t.pointee.base.deallocate()
                t.pointee.base = b
                t.pointee.capacity = c
            }
        }
    }

    /// Notes one call the library made of the caller's callback during the current call.
    static func callbackCalled(_ args: CallArgs) {
        let count = args.count
        let k = keySlot.load(ordering: .acquiring)
        guard current.load(ordering: .acquiring) > 1, k != 0, let p = pthread_getspecific(pthread_key_t(k - 1)) else { return }
        let t = p.assumingMemoryBound(to: CallThreadBuffer.self)
        guard t.pointee.depth == 1 else { return }
        t.pointee.callbackCalls += 1
        if t.pointee.callbackValues + count > t.pointee.callbackCapacity {
            let c = max(t.pointee.callbackCapacity * 2, t.pointee.callbackValues + count)
            let b = UnsafeMutablePointer<UInt64>.allocate(capacity: c)
            b.update(from: t.pointee.callbackArgs, count: t.pointee.callbackValues)
            t.pointee.callbackArgs.deallocate()
            t.pointee.callbackArgs = b
            t.pointee.callbackCapacity = c
        }
        for i in 0..<count { t.pointee.callbackArgs[t.pointee.callbackValues + i] = args[i] }
        t.pointee.callbackValues += count
    }

    /// What `begin` found: tracing off (run the call, record nothing), a call made from inside a
    /// recorded call (a callback's: not recorded; `end` counts it out), or a call to record.
    enum Begun { case off, nested(UnsafeMutablePointer<CallThreadBuffer>), recording(UnsafeMutablePointer<CallThreadBuffer>) }

    /// Starts the record of call `id` (`v`: `current` as the caller read it, not 1): its inputs.
    /// The export then runs the call itself (inline, not through a closure) and calls `end`.
    static func begin(_ v: UInt, _ id: CallID, _ a: CallArgs) -> Begun {
        var v = v
        if v == 0 {
            v = fromEnvironment()
            if v == 1 { return .off }
        }
        let t = threadBuffer()
        if t.pointee.depth > 0 {
            t.pointee.depth += 1
            return .nested(t)
        }
        if t.pointee.sink != v { attach(t, v) }
        let table = t.pointee.table
        let f = table.functions[id.rawValue]
        let args = t.pointee.args
        a.store(to: args)
        var w = CallRecorder(t)
        t.pointee.start = t.pointee.used
        t.pointee.callbackValues = 0
        t.pointee.callbackCalls = 0
        w.skip(CallTraceFormat.recordHeaderSize) // the header, written by `end`
        for i in 0..<Int(f.count) { recordInput(&w, table, table.params[Int(f.first) + i], i, args) }
        w.finish()
        t.pointee.depth = 1
        return .recording(t)
    }

    /// Ends the record `begin` started: the outputs, the result, the header; publishes it.
    static func end(_ t: UnsafeMutablePointer<CallThreadBuffer>, _ id: CallID, _ result: Int64,
                    _ resultString: UnsafePointer<CChar>?) {
        t.pointee.depth = 0
        let args = t.pointee.args
        let table = t.pointee.table
        let f = table.functions[id.rawValue]
        let ok = f.result != .status || result == 0
        var w = CallRecorder(t)
        for i in 0..<Int(f.count) { recordOutput(&w, table, table.params[Int(f.first) + i], i, args, ok) }
        if f.result == .string { w.string(resultString) }
        w.string(f.result == .status && !ok ? lastErrorPointer() : nil)
        w.finish()
        let seq = sequence.wrappingAdd(1, ordering: .relaxed).oldValue
        let start = t.pointee.start, h = t.pointee.base + start
        h.storeBytes(of: UInt32(truncatingIfNeeded: t.pointee.used - start).littleEndian, as: UInt32.self)
        h.storeBytes(of: UInt16(truncatingIfNeeded: id.rawValue).littleEndian, toByteOffset: 4, as: UInt16.self)
        h.storeBytes(of: t.pointee.id.littleEndian, toByteOffset: 6, as: UInt16.self)
        h.storeBytes(of: seq.littleEndian, toByteOffset: 8, as: UInt64.self)
        h.storeBytes(of: UInt64(bitPattern: result).littleEndian, toByteOffset: 16, as: UInt64.self)
        t.pointee.committed.store(t.pointee.used, ordering: .releasing)
        // A context's end is where a program's trace is most likely complete: write it out.
        if id == .npt_context_destroy { sink(t.pointee.sink).flush() }
    }

    private static func pointer(_ v: UInt64) -> UnsafeRawPointer? { UnsafeRawPointer(bitPattern: UInt(v)) }

    /// The bytes of a caller's struct: up to its `size` (versioned) or its fixed size.
    static func structLength(_ s: CallStruct, _ p: UnsafeRawPointer) -> Int {
        guard s.versioned else { return s.size }
        return min(Int(p.load(as: UInt32.self)), 1 << 16)
    }
    private static func structLength(_ s: CompactCallTable.Struct, _ p: UnsafeRawPointer) -> Int {
        guard s.versioned else { return Int(s.size) }
        return min(Int(p.load(as: UInt32.self)), 1 << 16)
    }

    /// Which pointer members to follow: all of an input struct; none of an output struct before the
    /// call (the caller need not have set them); its strings after it.
    enum Members { case all, none, strings }

    private static func recordPointerMembers(_ w: inout CallRecorder, _ table: CompactCallTable, _ s: CompactCallTable.Struct,
                                             _ p: UnsafeRawPointer, _ length: Int, _ members: Members) {
        if members == .none { return }
        for i in 0..<Int(s.pointerCount) {
            let m = table.pointers[Int(s.firstPointer) + i]
            guard Int(m.offset) + 8 <= length else { continue }
            let target = p.loadUnaligned(fromByteOffset: Int(m.offset), as: UInt.self)
            switch m.kind {
            case .string: w.string(UnsafePointer(bitPattern: target))
            case .bytes:
                if members == .strings { continue }
                let n = Int(m.lengthOffset) + 8 <= length ? p.loadUnaligned(fromByteOffset: Int(m.lengthOffset), as: Int.self) : 0
                w.blob(UnsafeRawPointer(bitPattern: target), n)
            }
        }
    }

    private static func recordStruct(_ w: inout CallRecorder, _ table: CompactCallTable, _ index: Int16, _ p: UnsafeRawPointer?,
                                     count: Int?, _ members: Members) {
        guard let p else { w.blob(nil, 0); return }
        let s = table.structs[Int(index)]
        let size = Int(s.size)
        if let count {
            let n = max(0, min(count, CallTraceFormat.maxBlob / max(size, 1)))
            w.blob(p, n * size)
            for i in 0..<n { recordPointerMembers(&w, table, s, p + i * size, size, members) }
        } else {
            let n = structLength(s, p)
            w.blob(p, n)
            recordPointerMembers(&w, table, s, p, n, members)
        }
    }

    @inline(__always)
    private static func recordInput(_ w: inout CallRecorder, _ table: CompactCallTable, _ p: CompactCallTable.Param, _ i: Int,
                                    _ args: UnsafeMutablePointer<UInt64>) {
        let v = args[i]
        switch p.kind {
        case .u32, .i32, .u64, .i64, .size, .handle, .userData: w.u64(v)
        case .handleOut, .stringOut, .bytesOut, .arrayOut: w.u8(v == 0 ? 0 : 1)
        case .u32Out, .i32Out:
            w.u8(v == 0 ? 0 : 1); w.u64(v == 0 ? 0 : UInt64(pointer(v)!.load(as: UInt32.self)))
        case .u64Out, .i64Out, .sizeOut:
            w.u8(v == 0 ? 0 : 1); w.u64(v == 0 ? 0 : pointer(v)!.load(as: UInt64.self))
        case .string: w.string(UnsafePointer(bitPattern: UInt(v)))
        case .bytesIn: w.blob(pointer(v), Int(bitPattern: UInt(args[Int(p.countParam)])))
        case .structIn, .structInOut:
            recordStruct(&w, table, p.structIndex, pointer(v), count: nil, p.kind == .structIn ? .all : .none)
        case .arrayIn:
            recordStruct(&w, table, p.structIndex, pointer(v), count: Int(bitPattern: UInt(args[Int(p.countParam)])), .all)
        case .callback: recordSymbol(&w, v)
        case .opsTable:
            guard let t = pointer(v) else { w.u32(CallTraceFormat.absent); return }
            // The table's name, then the name of every non-NULL function it has (the part its size covers).
            let size = min(Int(t.load(fromByteOffset: 4, as: UInt32.self)), MemoryLayout<npt_backend_ops>.size)
            let first = MemoryLayout<npt_backend_ops>.offset(of: \npt_backend_ops.vm_create)!
            let slots = size > first ? (size - first) / 8 : 0
            w.u32(UInt32(slots))
            w.string(size >= 16 ? UnsafePointer(bitPattern: t.load(fromByteOffset: 8, as: UInt.self)) : nil)
            for s in 0..<slots { recordSymbol(&w, UInt64(t.load(fromByteOffset: first + s * 8, as: UInt.self))) }
        }
    }

    /// A C function by name (dladdr), or "0x..." where it has none; NULL is absent.
    private static func recordSymbol(_ w: inout CallRecorder, _ v: UInt64) {
        guard let p = pointer(v) else { w.string(nil); return }
        if let n = nptkit_internal_symbol_name(p) {
            w.string(n)
        } else {
            let text = "0x" + String(v, radix: 16)
            w.string(text)
        }
    }

    @inline(__always)
    private static func recordOutput(_ w: inout CallRecorder, _ table: CompactCallTable, _ p: CompactCallTable.Param, _ i: Int,
                                     _ args: UnsafeMutablePointer<UInt64>, _ ok: Bool) {
        let v = args[i]
        switch p.kind {
        case .u32, .i32, .u64, .i64, .size, .handle, .userData, .string, .bytesIn, .structIn, .arrayIn, .opsTable: return
        case .handleOut: w.u64(ok && v != 0 ? UInt64(pointer(v)!.load(as: UInt.self)) : 0)
        case .stringOut:
            w.string(ok && v != 0 ? UnsafePointer(bitPattern: pointer(v)!.load(as: UInt.self)) : nil)
        case .u32Out, .i32Out: w.u64(v == 0 ? 0 : UInt64(pointer(v)!.load(as: UInt32.self)))
        case .u64Out, .i64Out, .sizeOut: w.u64(v == 0 ? 0 : pointer(v)!.load(as: UInt64.self))
        case .bytesOut:
            let cap = Int(bitPattern: UInt(args[Int(p.countParam)]))
            var n = ok ? cap : 0
            if ok, p.filledParam >= 0, let f = pointer(args[Int(p.filledParam)]) { n = min(cap, f.load(as: Int.self)) }
            w.blob(pointer(v), n)
        case .structInOut:
            // A failed call wrote nothing: what its pointer members hold is the caller's.
            recordStruct(&w, table, p.structIndex, pointer(v), count: nil, ok ? .strings : .none)
        case .arrayOut:
            let cap = Int(bitPattern: UInt(args[Int(p.countParam)]))
            var n = 0
            if ok, let f = pointer(args[Int(p.filledParam)]) { n = min(cap, f.load(as: Int.self)) }
            recordStruct(&w, table, p.structIndex, pointer(v), count: n, .strings)
        case .callback:
            let t = w.t
            w.u32(t.pointee.callbackCalls)
            for k in 0..<t.pointee.callbackValues { w.u64(t.pointee.callbackArgs[k]) }
        }
    }
}

// MARK: the hook every export calls

/// A C argument as the 64 bits the tracer records.
@inline(__always) func raw(_ v: OpaquePointer?) -> UInt64 { UInt64(UInt(bitPattern: v)) }
@inline(__always) func raw<T>(_ v: UnsafePointer<T>?) -> UInt64 { UInt64(UInt(bitPattern: v)) }
@inline(__always) func raw<T>(_ v: UnsafeMutablePointer<T>?) -> UInt64 { UInt64(UInt(bitPattern: v)) }
@inline(__always) func raw(_ v: UnsafeRawPointer?) -> UInt64 { UInt64(UInt(bitPattern: v)) }
@inline(__always) func raw(_ v: UnsafeMutableRawPointer?) -> UInt64 { UInt64(UInt(bitPattern: v)) }
@inline(__always) func raw(_ v: UInt32) -> UInt64 { UInt64(v) }
@inline(__always) func raw(_ v: Int32) -> UInt64 { UInt64(bitPattern: Int64(v)) }
@inline(__always) func raw(_ v: UInt64) -> UInt64 { v }
@inline(__always) func raw(_ v: Int64) -> UInt64 { UInt64(bitPattern: v) }
@inline(__always) func raw(_ v: Int) -> UInt64 { UInt64(bitPattern: Int64(v)) }
@inline(__always) func raw(_ v: npt_status) -> UInt64 { UInt64(bitPattern: Int64(v.rawValue)) }
@inline(__always) func raw(_ v: UInt) -> UInt64 { UInt64(v) }
@inline(__always) func raw(_ v: npt_leaf_cb?) -> UInt64 { UInt64(unsafeBitCast(v, to: UInt.self)) }

/// What an export returns, as the trace records it.
protocol TraceResult {
    var traceValue: Int64 { get }
    var traceString: UnsafePointer<CChar>? { get }
}
extension npt_status: TraceResult {
    var traceValue: Int64 { Int64(rawValue) }
    var traceString: UnsafePointer<CChar>? { nil }
}
extension UInt32: TraceResult {
    var traceValue: Int64 { Int64(self) }
    var traceString: UnsafePointer<CChar>? { nil }
}
extension Optional: TraceResult where Wrapped == UnsafePointer<CChar> {
    var traceValue: Int64 { 0 }
    var traceString: UnsafePointer<CChar>? { self }
}

/// Runs an export's body, recording the call when tracing is on (one atomic load when it is off).
/// `args` is evaluated only then.
@inline(__always)
func traced<R: TraceResult>(_ id: CallID, _ args: @autoclosure () -> CallArgs, _ body: () -> R) -> R {
    let v = CallTrace.current.load(ordering: .acquiring)
    if v == 1 { return body() }
    let a = args()
    switch CallTrace.begin(v, id, a) {
    case .off: return body()
    case .nested(let t):
        defer { t.pointee.depth -= 1 }
        return body()
    case .recording(let t):
        let r = body()
        CallTrace.end(t, id, r.traceValue, r.traceString)
        return r
    }
}

/// `api` with the call recorded when tracing is on (the function's name comes from the table).
@inline(__always)
func api(_ id: CallID, _ args: @autoclosure () -> CallArgs, _ body: () throws(NPTError) -> Void) -> npt_status {
    traced(id, args()) { api(CallTable.functions[id.rawValue].name, body) }
}
