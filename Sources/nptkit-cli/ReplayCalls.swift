import ArgumentParser
import CFFI
import NPTKit
#if canImport(Glibc)
import Glibc
#endif

/// `nptkit-cli replay-calls FILE`: re-executes a call trace (NPTKIT_CALL_TRACE) against libnptkit.so
/// through libffi, from the signature table generated from include/nptkit.h, and compares every
/// status, output and error message with the recording.
struct ReplayCalls: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "replay-calls",
        abstract: "Replay a C program's call trace (NPTKIT_CALL_TRACE=FILE) against libnptkit.so; report the first mismatch.")

    @Argument(help: "The trace file.")
    var file: String
    @Option(help: "The library to call (default: libnptkit.so beside this executable, then the installed one).")
    var library: String?
    @Flag(help: "Print every call.")
    var verbose = false

    func run() throws {
        let bytes = try readWholeFile(file)
        let lib = try CallReplayer.openLibrary(library)
        var replayer = try CallReplayer(trace: bytes, library: lib, verbose: verbose)
        let outcome = replayer.run()
        switch outcome {
        case .done(let calls, let threads):
            print("replay-calls: \(calls) calls (\(threads) recorded thread\(threads == 1 ? "" : "s")) replayed, 0 mismatches")
        case .mismatch(let call, let text):
            print("replay-calls: MISMATCH at call #\(call): \(text)")
            throw ExitCode(1)
        case .unreplayable(let call, let text):
            print("replay-calls: call #\(call) cannot be replayed: \(text)")
            throw ExitCode(2)
        }
    }
}

func readWholeFile(_ path: String) throws -> [UInt8] {
    let fd = open(path, O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { throw ValidationError("\(path): \(String(cString: strerror(errno)))") }
    defer { close(fd) }
    var out: [UInt8] = []
    var chunk = [UInt8](repeating: 0, count: 1 << 16)
    while true {
        let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
        if n < 0 { if errno == EINTR { continue }; throw ValidationError("\(path): \(String(cString: strerror(errno)))") }
        if n == 0 { break }
        out.append(contentsOf: chunk[0..<n])
    }
    return out
}

/// Reads the trace's little-endian fields.
struct TraceCursor {
    let bytes: [UInt8]
    var at: Int
    var end: Int
    struct Truncated: Error {}

    mutating func take(_ n: Int) throws -> ArraySlice<UInt8> {
        guard n >= 0, at + n <= end else { throw Truncated() }
        defer { at += n }
        return bytes[at..<at + n]
    }
    mutating func u8() throws -> UInt8 { try take(1).first! }
    mutating func u16() throws -> UInt16 { try take(2).reversed().reduce(0) { $0 << 8 | UInt16($1) } }
    mutating func u32() throws -> UInt32 { try take(4).reversed().reduce(0) { $0 << 8 | UInt32($1) } }
    mutating func u64() throws -> UInt64 { try take(8).reversed().reduce(0) { $0 << 8 | UInt64($1) } }
    /// A blob, nil for a NULL pointer.
    mutating func blob() throws -> [UInt8]? {
        let n = try u32()
        if n == CallTraceFormat.absent { return nil }
        return Array(try take(Int(n)))
    }
    mutating func string() throws -> String? { try blob().map { String(decoding: $0, as: UTF8.self) } }
}

/// The stand-in for a caller's callback: a libffi closure that logs every call's arguments.
final class CallbackStandIn {
    var calls: [[UInt64]] = []
    let cif: UnsafeMutablePointer<ffi_cif>
    let types: UnsafeMutablePointer<UnsafeMutablePointer<ffi_type>?>
    let closure: UnsafeMutablePointer<ffi_closure>
    let code: UnsafeMutableRawPointer
    let argc: Int

    init?(parameterTypes: [String]) {
        argc = parameterTypes.count
        cif = .allocate(capacity: 1)
        types = .allocate(capacity: argc)
        for (i, t) in parameterTypes.enumerated() { types[i] = CallReplayer.ffiType(cType: t) }
        guard ffi_prep_cif(cif, FFI_DEFAULT_ABI, UInt32(argc), nptffi_void(), types) == FFI_OK else { return nil }
        var code: UnsafeMutableRawPointer?
        guard let c = ffi_closure_alloc(MemoryLayout<ffi_closure>.size, &code), let code else { return nil }
        closure = c.assumingMemoryBound(to: ffi_closure.self)
        self.code = code
        let handler: @convention(c) (UnsafeMutablePointer<ffi_cif>?, UnsafeMutableRawPointer?,
                                     UnsafeMutablePointer<UnsafeMutableRawPointer?>?, UnsafeMutableRawPointer?) -> Void = { _, _, args, me in
            let standIn = Unmanaged<CallbackStandIn>.fromOpaque(me!).takeUnretainedValue()
            // Every argument but the last (user_data, which the library passes through unchanged).
            var values: [UInt64] = []
            for i in 0..<standIn.argc - 1 { values.append(args![i]!.load(as: UInt64.self)) }
            standIn.calls.append(values)
        }
        guard ffi_prep_closure_loc(closure, cif, handler, Unmanaged.passUnretained(self).toOpaque(), code) == FFI_OK else { return nil }
    }
    deinit {
        ffi_closure_free(closure)
        cif.deallocate()
        types.deallocate()
    }
}

struct CallReplayer {
    enum Outcome { case done(calls: Int, threads: Int), mismatch(call: Int, text: String), unreplayable(call: Int, text: String) }

    let library: UnsafeMutableRawPointer
    var cursor: TraceCursor
    let verbose: Bool
    /// Recorded handle -> the handle the replay made.
    var handles: [UInt64: UInt64] = [:]
    var functions: [UnsafeMutableRawPointer?] = []
    let lastError: (@convention(c) () -> UnsafePointer<CChar>?)?

    static func openLibrary(_ path: String?) throws -> UnsafeMutableRawPointer {
        var candidates: [String] = []
        if let path { candidates = [path] } else {
            var buf = [CChar](repeating: 0, count: 4096)
            let n = readlink("/proc/self/exe", &buf, buf.count - 1)
            if n > 0 {
                let exe = String(decoding: buf[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
                let dir = exe.split(separator: "/", omittingEmptySubsequences: false).dropLast().joined(separator: "/")
                candidates.append(dir + "/libnptkit.so")
                candidates.append(dir + "/../lib/libnptkit.so.1")
            }
            candidates.append("libnptkit.so.1")
        }
        var why: [String] = []
        for c in candidates {
            if let h = dlopen(c, RTLD_NOW | RTLD_LOCAL) { return h }
            why.append(dlerror().map { String(cString: $0) } ?? c)
        }
        throw ValidationError("cannot load the library: \(why.joined(separator: "; "))")
    }

    init(trace: [UInt8], library: UnsafeMutableRawPointer, verbose: Bool) throws {
        self.library = library
        self.verbose = verbose
        cursor = TraceCursor(bytes: trace, at: 0, end: trace.count)
        guard trace.count >= CallTraceFormat.headerSize, Array(trace[0..<8]) == CallTraceFormat.magic else {
            throw ValidationError("not a call trace (no NPTCALLS header)")
        }
        cursor.at = 8
        let version = try cursor.u32(), abi = try cursor.u32(), fingerprint = try cursor.u64()
        guard version == CallTraceFormat.version else { throw ValidationError("call-trace format \(version), this replayer reads \(CallTraceFormat.version)") }
        guard fingerprint == CallTable.fingerprint else {
            throw ValidationError("the trace was recorded by a library of another signature table (ABI \(abi >> 16).\(abi & 0xFFFF), table \(String(fingerprint, radix: 16)); this replayer's table is \(String(CallTable.fingerprint, radix: 16)))")
        }
        for f in CallTable.functions { functions.append(dlsym(library, f.name)) }
        lastError = dlsym(library, "npt_last_error").map { unsafeBitCast($0, to: (@convention(c) () -> UnsafePointer<CChar>?).self) }
    }

    static func ffiType(cType t: String) -> UnsafeMutablePointer<ffi_type> {
        if t.hasSuffix("*") { return nptffi_pointer() }
        switch t {
        case "uint32_t": return nptffi_uint32()
        case "int", "int32_t", "npt_status": return nptffi_sint32()
        case "int64_t": return nptffi_sint64()
        default: return nptffi_uint64()
        }
    }

    static func ffiType(_ k: CallParamKind) -> UnsafeMutablePointer<ffi_type> {
        switch k {
        case .u32: return nptffi_uint32()
        case .i32: return nptffi_sint32()
        case .u64, .size: return nptffi_uint64()
        case .i64: return nptffi_sint64()
        default: return nptffi_pointer()
        }
    }

    /// The records' offsets in the order the calls returned (their sequence numbers: the file holds
    /// them in per-thread blocks), or where the trace is malformed.
    func recordsInCallOrder() -> Result<[Int], ValidationError> {
        var records: [(seq: UInt64, at: Int)] = []
        var at = CallTraceFormat.headerSize
        let b = cursor.bytes
        while at < b.count {
            guard at + CallTraceFormat.recordHeaderSize <= b.count else {
                return .failure(ValidationError("the record at byte \(at) is truncated"))
            }
            let length = b.withUnsafeBytes { Int(UInt32(littleEndian: $0.loadUnaligned(fromByteOffset: at, as: UInt32.self))) }
            guard length >= CallTraceFormat.recordHeaderSize, at + length <= b.count else {
                return .failure(ValidationError("the record at byte \(at) is truncated or malformed (length \(length))"))
            }
            let seq = b.withUnsafeBytes { UInt64(littleEndian: $0.loadUnaligned(fromByteOffset: at + 8, as: UInt64.self)) }
            records.append((seq, at))
            at += length
        }
        records.sort { $0.seq < $1.seq }
        return .success(records.map(\.at))
    }

    mutating func run() -> Outcome {
        let order: [Int]
        switch recordsInCallOrder() {
        case .success(let o): order = o
        case .failure(let e): return .unreplayable(call: 0, text: e.message)
        }
        var calls = 0
        var threads = Set<UInt16>()
        for at in order {
            calls += 1
            cursor.at = at
            do {
                if let problem = try replayOne(calls, &threads) { return problem }
            } catch is TraceCursor.Truncated {
                return .unreplayable(call: calls, text: "the record is truncated or malformed (byte \(cursor.at))")
            } catch {
                return .unreplayable(call: calls, text: "\(error)")
            }
        }
        return .done(calls: calls, threads: threads.count)
    }

    /// What one parameter needs at the call and afterwards.
    struct Slot {
        var value = [UInt64](repeating: 0, count: 1) // the argument itself (ffi reads it from here)
        var memory: UnsafeMutableRawPointer?         // what a pointer argument points to
        var length = 0
        var owned: [UnsafeMutableRawPointer] = []    // strings and buffers to free
        var recordedPre: UInt64 = 0
        var standIn: CallbackStandIn?
    }

    static func copy(_ b: [UInt8]?, extra: Int = 0) -> UnsafeMutableRawPointer? {
        guard let b else { return nil }
        let p = UnsafeMutableRawPointer.allocate(byteCount: max(b.count + extra, 1), alignment: 16)
        p.initializeMemory(as: UInt8.self, repeating: 0, count: max(b.count + extra, 1))
        b.withUnsafeBytes { if $0.count > 0 { p.copyMemory(from: $0.baseAddress!, byteCount: $0.count) } }
        return p
    }

    /// Rebuilds the pointer members of `n` elements of struct `s` at `base` from the trace.
    mutating func patchPointers(_ s: CallStruct, _ base: UnsafeMutableRawPointer, _ length: Int, count: Int, _ slot: inout Slot) throws {
        for e in 0..<count {
            for m in s.pointers where m.offset + 8 <= length {
                let field = base + e * s.size + m.offset
                let data: [UInt8]?
                switch m.kind {
                case .string: data = try cursor.blob().map { $0 + [0] }
                case .bytes: data = try cursor.blob()
                }
                let p = Self.copy(data)
                if let p { slot.owned.append(p) }
                field.storeBytes(of: UInt(bitPattern: p), as: UInt.self)
            }
        }
    }

    mutating func replayOne(_ n: Int, _ threads: inout Set<UInt16>) throws -> Outcome? {
        let start = cursor.at
        let length = Int(try cursor.u32())
        guard length >= CallTraceFormat.recordHeaderSize, start + length <= cursor.bytes.count else { throw TraceCursor.Truncated() }
        cursor.end = start + length
        defer { cursor.at = start + length; cursor.end = cursor.bytes.count }
        let id = Int(try cursor.u16())
        let thread = try cursor.u16()
        threads.insert(thread)
        _ = try cursor.u64() // the sequence number (run() ordered the records by it)
        let recordedResult = Int64(bitPattern: try cursor.u64())
        guard id < CallTable.functions.count else { return .unreplayable(call: n, text: "function #\(id) is not in the table") }
        let f = CallTable.functions[id]
        guard let fn = functions[id] else { return .unreplayable(call: n, text: "\(f.name) is not in the library") }
        var slots = [Slot](repeating: Slot(), count: f.params.count)
        defer { for s in slots { s.owned.forEach { $0.deallocate() }; s.memory?.deallocate() } }
        var shown: [String] = []

        // Inputs: rebuild every argument.
        for (i, p) in f.params.enumerated() {
            var s = Slot()
            switch p.kind {
            case .u32, .i32, .u64, .i64, .size, .userData:
                s.value[0] = try cursor.u64(); shown.append("\(p.name)=\(hexText(s.value[0]))")
            case .handle:
                let h = try cursor.u64()
                s.value[0] = handles[h] ?? h
                shown.append("\(p.name)=\(h == 0 ? "NULL" : "#" + hexText(h))")
            case .handleOut, .stringOut:
                if try cursor.u8() != 0 { s.memory = Self.copy([UInt8](repeating: 0, count: 8)); s.value[0] = UInt64(UInt(bitPattern: s.memory)) }
                shown.append(p.name)
            case .u32Out, .i32Out, .u64Out, .i64Out, .sizeOut:
                let present = try cursor.u8() != 0
                s.recordedPre = try cursor.u64()
                if present {
                    s.memory = Self.copy([UInt8](repeating: 0, count: 8))
                    if p.kind == .u32Out || p.kind == .i32Out { s.memory!.storeBytes(of: UInt32(truncatingIfNeeded: s.recordedPre), as: UInt32.self) }
                    else { s.memory!.storeBytes(of: s.recordedPre, as: UInt64.self) }
                    s.value[0] = UInt64(UInt(bitPattern: s.memory))
                }
                shown.append(p.name)
            case .string:
                let b = try cursor.blob()
                s.memory = Self.copy(b.map { $0 + [0] }); s.value[0] = UInt64(UInt(bitPattern: s.memory))
                shown.append("\(p.name)=\(b.map { "\"" + String(decoding: $0, as: UTF8.self) + "\"" } ?? "NULL")")
            case .bytesIn:
                let b = try cursor.blob()
                s.memory = Self.copy(b); s.value[0] = UInt64(UInt(bitPattern: s.memory))
                shown.append("\(p.name)[\(b?.count ?? 0)]")
            case .bytesOut:
                if try cursor.u8() != 0 { s.length = -1 } // allocated once the capacity is known (below)
                shown.append(p.name)
            case .structIn, .structInOut, .arrayIn:
                let st = CallTable.structs[p.structIndex]
                let b = try cursor.blob()
                if let b {
                    s.length = b.count
                    s.memory = Self.copy(b, extra: max(0, st.size - b.count))
                    s.value[0] = UInt64(UInt(bitPattern: s.memory))
                    if p.kind == .arrayIn {
                        try patchPointers(st, s.memory!, st.size, count: b.count / max(st.size, 1), &s)
                    } else if p.kind == .structIn {
                        try patchPointers(st, s.memory!, b.count, count: 1, &s)
                    } else {
                        // An output's pointer members held the recorded process's addresses.
                        for m in st.pointers where m.offset + 8 <= b.count { s.memory!.storeBytes(of: UInt(0), toByteOffset: m.offset, as: UInt.self) }
                    }
                }
                shown.append(b == nil ? "\(p.name)=NULL" : "\(p.name){\(b!.count) bytes}")
            case .arrayOut:
                if try cursor.u8() != 0 { s.length = -1 }
                shown.append(p.name)
            case .callback:
                let name = try cursor.string()
                if let name {
                    guard let standIn = CallbackStandIn(parameterTypes: CallTable.callbacks["npt_leaf_cb"] ?? []) else {
                        return .unreplayable(call: n, text: "libffi could not make a closure for callback \(name)")
                    }
                    s.standIn = standIn
                    s.value[0] = UInt64(UInt(bitPattern: standIn.code))
                }
                shown.append("\(p.name)=\(name ?? "NULL")")
            case .opsTable:
                let slots = try cursor.u32()
                if slots == CallTraceFormat.absent { shown.append("ops=NULL"); break }
                let name = try cursor.string() ?? "?"
                var fns: [String] = []
                for _ in 0..<slots { if let f = try cursor.string() { fns.append(f) } }
                return .unreplayable(call: n, text: "\(f.name): backend '\(name)' is a table of the recorded program's own functions (\(fns.prefix(4).joined(separator: ", "))\(fns.count > 4 ? ", ..." : "")), which are not in this process; load it as a plugin (npt_plugin_load) to make a trace replayable")
            }
            slots[i] = s
        }
        // Output buffers: their capacity is another argument.
        for (i, p) in f.params.enumerated() where slots[i].length == -1 {
            let cap = Int(slots[p.countParam].value[0])
            let elem = p.kind == .arrayOut ? CallTable.structs[p.structIndex].size : 1
            guard cap >= 0, cap <= CallTraceFormat.maxBlob / max(elem, 1) else {
                return .unreplayable(call: n, text: "\(f.name): \(p.name) has a capacity of \(cap) elements")
            }
            slots[i].memory = Self.copy([UInt8](repeating: 0, count: cap * elem))
            slots[i].length = cap * elem
            slots[i].value[0] = UInt64(UInt(bitPattern: slots[i].memory))
        }

        // The call.
        var cif = ffi_cif()
        let types = UnsafeMutablePointer<UnsafeMutablePointer<ffi_type>?>.allocate(capacity: max(f.params.count, 1))
        let values = UnsafeMutablePointer<UnsafeMutableRawPointer?>.allocate(capacity: max(f.params.count, 1))
        defer { types.deallocate(); values.deallocate() }
        for (i, p) in f.params.enumerated() { types[i] = Self.ffiType(p.kind) }
        let rtype: UnsafeMutablePointer<ffi_type> = f.result == .string ? nptffi_pointer() : (f.result == .u32 ? nptffi_uint32() : nptffi_sint32())
        guard ffi_prep_cif(&cif, FFI_DEFAULT_ABI, UInt32(f.params.count), rtype, types) == FFI_OK else {
            return .unreplayable(call: n, text: "ffi_prep_cif failed for \(f.name)")
        }
        var ret: UInt64 = 0
        let call = "\(f.name)(\(shown.joined(separator: ", ")))"
        return try slots.withUnsafeMutableBufferPointer { sl -> Outcome? in
            var storage: [UnsafeMutablePointer<UInt64>] = []
            for i in 0..<f.params.count {
                let cell = UnsafeMutablePointer<UInt64>.allocate(capacity: 1)
                cell.pointee = sl[i].value[0]
                storage.append(cell)
                values[i] = UnsafeMutableRawPointer(cell)
            }
            defer { storage.forEach { $0.deallocate() } }
            ffi_call(&cif, unsafeBitCast(fn, to: (@convention(c) () -> Void).self), &ret, values)
            if verbose { print("#\(n) [thread \(thread)] \(call)") }
            return try compare(n, f, call, sl, ret, recordedResult)
        }
    }

    private func statusName(_ v: Int64) -> String {
        guard let f = dlsym(library, "npt_status_string") else { return "\(v)" }
        let s = unsafeBitCast(f, to: (@convention(c) (Int32) -> UnsafePointer<CChar>).self)(Int32(truncatingIfNeeded: v))
        return String(String(cString: s).prefix { $0 != ":" }) + " (\(v))"
    }

    private mutating func compare(_ n: Int, _ f: CallFunction, _ call: String, _ slots: UnsafeMutableBufferPointer<Slot>,
                                  _ ret: UInt64, _ recordedResult: Int64) throws -> Outcome? {
        let result: Int64
        switch f.result {
        case .status: result = Int64(Int32(truncatingIfNeeded: ret))
        case .u32: result = Int64(UInt32(truncatingIfNeeded: ret))
        case .string: result = 0
        }
        func differ(_ what: String, _ got: String, _ recorded: String) -> Outcome {
            .mismatch(call: n, text: "\(call): \(what) is \(got), recorded \(recorded)")
        }
        if result != recordedResult {
            return f.result == .status ? differ("the status", statusName(result), statusName(recordedResult))
                                       : differ("the result", "\(result)", "\(recordedResult)")
        }
        let ok = f.result != .status || result == 0
        for (i, p) in f.params.enumerated() {
            let s = slots[i]
            switch p.kind {
            case .u32, .i32, .u64, .i64, .size, .handle, .userData, .string, .bytesIn, .structIn, .arrayIn, .opsTable: continue
            case .handleOut:
                let recorded = try cursor.u64()
                let got = s.memory.map { UInt64($0.load(as: UInt.self)) } ?? 0
                if recorded != 0 { handles[recorded] = got }
                if (recorded == 0) != (got == 0) { return differ("*\(p.name)", got == 0 ? "NULL" : "a handle", recorded == 0 ? "NULL" : "a handle") }
            case .stringOut:
                let recorded = try cursor.string()
                let got: String? = ok ? s.memory.flatMap { UnsafePointer<CChar>(bitPattern: $0.load(as: UInt.self)) }.map { String(cString: $0) } : nil
                if got != recorded { return differ("*\(p.name)", quoted(got), quoted(recorded)) }
            case .u32Out, .i32Out, .u64Out, .i64Out, .sizeOut:
                let recorded = try cursor.u64()
                let narrow = p.kind == .u32Out || p.kind == .i32Out
                let got = s.memory.map { narrow ? UInt64($0.load(as: UInt32.self)) : $0.load(as: UInt64.self) } ?? 0
                if got != recorded { return differ("*\(p.name)", hexText(got), hexText(recorded)) }
            case .bytesOut:
                let recorded = try cursor.blob() ?? []
                var got = [UInt8](repeating: 0, count: recorded.count)
                if let m = s.memory, recorded.count <= s.length { got = Array(UnsafeRawBufferPointer(start: m, count: recorded.count)) }
                if let at = recorded.indices.first(where: { got[$0] != recorded[$0] }) {
                    return differ("\(p.name)[\(at)]", hexText(UInt64(got.indices.contains(at) ? got[at] : 0)), hexText(UInt64(recorded[at])))
                }
            case .structInOut, .arrayOut:
                let st = CallTable.structs[p.structIndex]
                let recorded = try cursor.blob()
                guard let recorded else { continue }
                let count = p.kind == .arrayOut ? recorded.count / max(st.size, 1) : 1
                let length = p.kind == .arrayOut ? st.size : recorded.count
                guard let m = s.memory, recorded.count <= max(s.length, st.size) else { return differ(p.name, "not written", "written") }
                let got = Array(UnsafeRawBufferPointer(start: m, count: recorded.count))
                // Pointer members are compared by what they point to.
                var skip = Set<Int>()
                for e in 0..<count {
                    for o in st.pointers.map(\.offset) + st.timeOffsets where o + 8 <= length { for b in 0..<8 { skip.insert(e * st.size + o + b) } }
                }
                if let at = recorded.indices.first(where: { !skip.contains($0) && got[$0] != recorded[$0] }) {
                    return differ("\(p.name) byte \(at) (\(st.name))", hexText(UInt64(got[at])), hexText(UInt64(recorded[at])))
                }
                for e in 0..<count where ok {
                    for ptr in st.pointers where ptr.offset + 8 <= length && ptr.kind == .string {
                        let want = try cursor.string()
                        let g = UnsafePointer<CChar>(bitPattern: (m + e * st.size + ptr.offset).load(as: UInt.self)).map { String(cString: $0) }
                        if g != want { return differ("\(p.name) string at offset \(e * st.size + ptr.offset)", quoted(g), quoted(want)) }
                    }
                }
            case .callback:
                let count = Int(try cursor.u32())
                let argc = max((CallTable.callbacks["npt_leaf_cb"]?.count ?? 1) - 1, 0)
                var recorded: [[UInt64]] = []
                for _ in 0..<count { recorded.append(try (0..<argc).map { _ in try cursor.u64() }) }
                let got = s.standIn?.calls ?? []
                if got != recorded {
                    let at = (0..<min(got.count, recorded.count)).first { got[$0] != recorded[$0] } ?? min(got.count, recorded.count)
                    return differ("callback \(p.name): call \(at) of \(recorded.count)",
                                  at < got.count ? got[at].map(hexText).joined(separator: ", ") : "missing",
                                  at < recorded.count ? recorded[at].map(hexText).joined(separator: ", ") : "none")
                }
            }
        }
        if f.result == .string {
            let recorded = try cursor.string()
            let got = UnsafePointer<CChar>(bitPattern: UInt(ret)).map { String(cString: $0) }
            if got != recorded { return differ("the result", quoted(got), quoted(recorded)) }
        }
        let recordedError = try cursor.string()
        if f.result == .status && !ok {
            let got = lastError?().map { String(cString: $0) }
            if got != recordedError { return differ("npt_last_error()", quoted(got), quoted(recordedError)) }
        }
        return nil
    }
}

private func hexText(_ v: UInt64) -> String { "0x" + String(v, radix: 16) }
private func quoted(_ s: String?) -> String { s.map { "\"\($0)\"" } ?? "NULL" }
