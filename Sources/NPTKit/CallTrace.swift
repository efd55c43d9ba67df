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
///   record = u32 length (whole record) u16 function (CallID) u16 thread i64 result, then for every
///            parameter its input, then for every parameter its output, then the result string
///            (string results) and the npt_last_error() of a failed call
///   blob   = u32 length (0xFFFFFFFF: NULL pointer) + bytes; a string is a blob without its NUL
package enum CallTraceFormat {
    package static let magic: [UInt8] = Array("NPTCALLS".utf8)
    package static let version: UInt32 = 1
    package static let headerSize = 24
    package static let recordHeaderSize = 16
    package static let absent: UInt32 = 0xFFFF_FFFF
    /// The most bytes recorded of one buffer or struct (a larger one is a caller error the library refuses anyway).
    package static let maxBlob = 1 << 30
}

/// Appends the encoding of one record.
struct CallWriter {
    var bytes: [UInt8] = []

    mutating func u8(_ v: UInt8) { bytes.append(v) }
    mutating func u16(_ v: UInt16) { withUnsafeBytes(of: v.littleEndian) { bytes.append(contentsOf: $0) } }
    mutating func u32(_ v: UInt32) { withUnsafeBytes(of: v.littleEndian) { bytes.append(contentsOf: $0) } }
    mutating func u64(_ v: UInt64) { withUnsafeBytes(of: v.littleEndian) { bytes.append(contentsOf: $0) } }
    mutating func blob(_ p: UnsafeRawPointer?, _ n: Int) {
        guard let p, n >= 0, n <= CallTraceFormat.maxBlob else { u32(CallTraceFormat.absent); return }
        u32(UInt32(n))
        bytes.append(contentsOf: UnsafeRawBufferPointer(start: p, count: n))
    }
    mutating func string(_ p: UnsafePointer<CChar>?) {
        guard let p else { u32(CallTraceFormat.absent); return }
        blob(p, strlen(p))
    }
}

/// The call tracer: on when NPTKIT_CALL_TRACE names a file (read once, at the first call).
enum CallTrace {
    /// 0: NPTKIT_CALL_TRACE not read yet; 1: tracing off; else the Sink (retained for the process).
    private static let current = Atomic<UInt>(0)
    private static let startLock = NPTMutex(())

    /// The open trace, or nil (tracing off). The first call reads NPTKIT_CALL_TRACE.
    @inline(__always)
    static var sink: Sink? {
        let v = current.load(ordering: .acquiring)
        if v == 1 { return nil }
        if v == 0 { return fromEnvironment() }
        return Unmanaged<Sink>.fromOpaque(UnsafeRawPointer(bitPattern: v)!).takeUnretainedValue()
    }

    private static func fromEnvironment() -> Sink? {
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
        return sink
    }

    private static func install(_ sink: Sink?) {
        current.store(sink.map { UInt(bitPattern: Unmanaged.passRetained($0).toOpaque()) } ?? 1, ordering: .releasing)
    }

    /// Starts tracing into `path` (replacing NPTKIT_CALL_TRACE's trace, which is written out first).
    static func start(path: String) throws(NPTError) {
        let s = try Sink(path: path)
        _ = sink // the environment is read first, so it cannot start a trace later
        startLock.withLock { _ in sink?.flush(); install(s) }
    }

    /// Writes out and stops the trace (calls in flight may still add their record to it).
    static func stop() {
        _ = sink
        startLock.withLock { _ in sink?.flush(); install(nil) }
    }

    final class Sink: @unchecked Sendable {
        private struct State { var buffer: [UInt8] = []; var threads = 0 }
        private let state = NPTMutex(State())
        private let fd: Int32
        init(path: String) throws(NPTError) {
            fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
            guard fd >= 0 else { throw .invalid("cannot open \(path) for the call trace: \(String(cString: strerror(errno)))") }
            var w = CallWriter()
            w.bytes.append(contentsOf: CallTraceFormat.magic)
            w.u32(CallTraceFormat.version)
            w.u32(NPTABI.version)
            w.u64(CallTable.fingerprint)
            state.withLock { $0.buffer = w.bytes; $0.buffer.reserveCapacity(1 << 20) }
        }
        func newThreadID() -> UInt16 { state.withLock { s in s.threads += 1; return UInt16(truncatingIfNeeded: s.threads) } }
        func append(_ record: [UInt8]) {
            state.withLock { s in
                s.buffer.append(contentsOf: record)
                if s.buffer.count >= 1 << 20 { write(&s.buffer) }
            }
        }
        func flush() { state.withLock { write(&$0.buffer); _ = fsync(fd) } }
        private func write(_ b: inout [UInt8]) {
            b.withUnsafeBytes { p in
                var off = 0
                while off < p.count {
                    let n = Glibc.write(fd, p.baseAddress! + off, p.count - off)
                    if n <= 0 { if errno == EINTR { continue }; break }
                    off += n
                }
            }
            b.removeAll(keepingCapacity: true)
        }
    }

    /// Per-thread recording state: the record being built (reused), the callback calls of the
    /// current call, and the depth (calls a callback makes back into the library are not recorded:
    /// the replayer's stand-in callback makes none).
    final class ThreadState {
        var writer = CallWriter()
        var callbackArgs: [UInt64] = []
        var callbackCalls: UInt32 = 0
        var depth = 0
        var id: UInt16 = 0
        init() { writer.bytes.reserveCapacity(4096) }
    }
    private static let key: pthread_key_t = {
        var k = pthread_key_t()
        pthread_key_create(&k) { p in if let p { Unmanaged<ThreadState>.fromOpaque(p).release() } }
        return k
    }()
    static func threadState() -> ThreadState {
        if let p = pthread_getspecific(key) { return Unmanaged<ThreadState>.fromOpaque(p).takeUnretainedValue() }
        let t = ThreadState()
        pthread_setspecific(key, Unmanaged.passRetained(t).toOpaque())
        return t
    }

    /// Notes one call the library made of the caller's callback during the current call.
    static func callbackCalled(_ args: UInt64...) {
        guard sink != nil, let p = pthread_getspecific(key) else { return }
        let t = Unmanaged<ThreadState>.fromOpaque(p).takeUnretainedValue()
        guard t.depth == 1 else { return }
        t.callbackCalls += 1
        t.callbackArgs.append(contentsOf: args)
    }

    /// Records `call` around `body`.
    static func record<R: TraceResult>(_ sink: Sink, _ id: CallID, _ args: [UInt64], _ body: () -> R) -> R {
        let t = threadState()
        if t.depth > 0 {
            t.depth += 1
            defer { t.depth -= 1 }
            return body()
        }
        if t.id == 0 { t.id = sink.newThreadID() }
        let f = CallTable.functions[id.rawValue]
        t.writer.bytes.removeAll(keepingCapacity: true)
        t.callbackArgs.removeAll(keepingCapacity: true)
        t.callbackCalls = 0
        t.writer.u32(0) // length, patched below
        t.writer.u16(UInt16(id.rawValue))
        t.writer.u16(t.id)
        t.writer.u64(0) // result, patched below
        for (i, p) in f.params.enumerated() { recordInput(&t.writer, p, i, args) }
        t.depth = 1
        let r = body()
        t.depth = 0
        let result = r.traceValue
        let ok = f.result != .status || result == 0
        let resultString = r.traceString
        for (i, p) in f.params.enumerated() { recordOutput(t, p, i, args, ok) }
        if f.result == .string { t.writer.string(resultString) }
        t.writer.string(f.result == .status && !ok ? lastErrorPointer() : nil)
        t.writer.bytes.withUnsafeMutableBytes { b in
            b.storeBytes(of: UInt32(b.count).littleEndian, toByteOffset: 0, as: UInt32.self)
            b.storeBytes(of: UInt64(bitPattern: result).littleEndian, toByteOffset: 8, as: UInt64.self)
        }
        sink.append(t.writer.bytes)
        // A context's end is where a program's trace is most likely complete: write it out.
        if id == .npt_context_destroy { sink.flush() }
        return r
    }

    private static func pointer(_ v: UInt64) -> UnsafeRawPointer? { UnsafeRawPointer(bitPattern: UInt(v)) }

    /// The bytes of a caller's struct: up to its `size` (versioned) or its fixed size.
    static func structLength(_ s: CallStruct, _ p: UnsafeRawPointer) -> Int {
        guard s.versioned else { return s.size }
        return min(Int(p.load(as: UInt32.self)), 1 << 16)
    }

    /// Which pointer members to follow: all of an input struct; none of an output struct before the
    /// call (the caller need not have set them); its strings after it.
    enum Members { case all, none, strings }

    private static func recordPointerMembers(_ w: inout CallWriter, _ s: CallStruct, _ p: UnsafeRawPointer, _ length: Int, _ members: Members) {
        if members == .none { return }
        for m in s.pointers where m.offset + 8 <= length {
            let target = p.load(fromByteOffset: m.offset, as: UInt.self)
            switch m.kind {
            case .string: w.string(UnsafePointer(bitPattern: target))
            case .bytes:
                if members == .strings { continue }
                let n = m.lengthOffset + 8 <= length ? p.load(fromByteOffset: m.lengthOffset, as: Int.self) : 0
                w.blob(UnsafeRawPointer(bitPattern: target), n)
            }
        }
    }

    private static func recordStruct(_ w: inout CallWriter, _ s: CallStruct, _ p: UnsafeRawPointer?, count: Int?, _ members: Members) {
        guard let p else { w.blob(nil, 0); return }
        if let count {
            let n = max(0, min(count, CallTraceFormat.maxBlob / max(s.size, 1)))
            w.blob(p, n * s.size)
            for i in 0..<n { recordPointerMembers(&w, s, p + i * s.size, s.size, members) }
        } else {
            let n = structLength(s, p)
            w.blob(p, n)
            recordPointerMembers(&w, s, p, n, members)
        }
    }

    private static func recordInput(_ w: inout CallWriter, _ p: CallParam, _ i: Int, _ args: [UInt64]) {
        let v = args[i]
        switch p.kind {
        case .u32, .i32, .u64, .i64, .size, .handle, .userData: w.u64(v)
        case .handleOut, .stringOut, .bytesOut, .arrayOut: w.u8(v == 0 ? 0 : 1)
        case .u32Out, .i32Out:
            w.u8(v == 0 ? 0 : 1); w.u64(v == 0 ? 0 : UInt64(pointer(v)!.load(as: UInt32.self)))
        case .u64Out, .i64Out, .sizeOut:
            w.u8(v == 0 ? 0 : 1); w.u64(v == 0 ? 0 : pointer(v)!.load(as: UInt64.self))
        case .string: w.string(UnsafePointer(bitPattern: UInt(v)))
        case .bytesIn: w.blob(pointer(v), Int(bitPattern: UInt(args[p.countParam])))
        case .structIn, .structInOut:
            recordStruct(&w, CallTable.structs[p.structIndex], pointer(v), count: nil, p.kind == .structIn ? .all : .none)
        case .arrayIn:
            recordStruct(&w, CallTable.structs[p.structIndex], pointer(v), count: Int(bitPattern: UInt(args[p.countParam])), .all)
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
    private static func recordSymbol(_ w: inout CallWriter, _ v: UInt64) {
        guard let p = pointer(v) else { w.string(nil); return }
        if let n = nptkit_internal_symbol_name(p) {
            w.string(n)
        } else {
            let text = "0x" + String(v, radix: 16)
            text.withCString { w.string($0) }
        }
    }

    private static func recordOutput(_ t: ThreadState, _ p: CallParam, _ i: Int, _ args: [UInt64], _ ok: Bool) {
        let v = args[i]
        switch p.kind {
        case .u32, .i32, .u64, .i64, .size, .handle, .userData, .string, .bytesIn, .structIn, .arrayIn, .opsTable: return
        case .handleOut: t.writer.u64(ok && v != 0 ? UInt64(pointer(v)!.load(as: UInt.self)) : 0)
        case .stringOut:
            t.writer.string(ok && v != 0 ? UnsafePointer(bitPattern: pointer(v)!.load(as: UInt.self)) : nil)
        case .u32Out, .i32Out: t.writer.u64(v == 0 ? 0 : UInt64(pointer(v)!.load(as: UInt32.self)))
        case .u64Out, .i64Out, .sizeOut: t.writer.u64(v == 0 ? 0 : pointer(v)!.load(as: UInt64.self))
        case .bytesOut:
            let cap = Int(bitPattern: UInt(args[p.countParam]))
            var n = ok ? cap : 0
            if ok, p.filledParam >= 0, let f = pointer(args[p.filledParam]) { n = min(cap, f.load(as: Int.self)) }
            t.writer.blob(pointer(v), n)
        case .structInOut:
            // A failed call wrote nothing: what its pointer members hold is the caller's.
            recordStruct(&t.writer, CallTable.structs[p.structIndex], pointer(v), count: nil, ok ? .strings : .none)
        case .arrayOut:
            let cap = Int(bitPattern: UInt(args[p.countParam]))
            var n = 0
            if ok, let f = pointer(args[p.filledParam]) { n = min(cap, f.load(as: Int.self)) }
            recordStruct(&t.writer, CallTable.structs[p.structIndex], pointer(v), count: n, .strings)
        case .callback:
            t.writer.u32(t.callbackCalls)
            for a in t.callbackArgs { t.writer.u64(a) }
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

/// Runs an export's body, recording the call when tracing is on. `args` is evaluated only then.
@inline(__always)
func traced<R: TraceResult>(_ id: CallID, _ args: @autoclosure () -> [UInt64], _ body: () -> R) -> R {
    if let sink = CallTrace.sink { return CallTrace.record(sink, id, args(), body) }
    return body()
}

/// `api` with the call recorded when tracing is on (the function's name comes from the table).
@inline(__always)
func api(_ id: CallID, _ args: @autoclosure () -> [UInt64], _ body: () throws(NPTError) -> Void) -> npt_status {
    traced(id, args()) { api(CallTable.functions[id.rawValue].name, body) }
}
