// The fields of each KVM tracepoint, in every format the kernel has printed
// (docs/trace-format.md, "Kernel traces", lists them with their TP_printk strings).

struct FieldError: Error { var message: String; init(_ m: String) { message = m } }

enum KernelEventFields {
    static func parse(name: String, _ fields: Substring) throws(FieldError) -> KernelEvent {
        // perf's libtraceevent prints "[FAILED TO PARSE] field=value ..." for a format it cannot read.
        if fields.hasPrefix("[FAILED TO PARSE]") {
            return try raw(name: name, fields.dropFirst("[FAILED TO PARSE]".count))
        }
        switch name {
        case "kvm_exit": return .exit(try exit(fields))
        case "kvm_entry": return .entry(try entry(fields))
        case "kvm_page_fault": return .pageFault(try pageFault(fields))
        case "kvm_mmio": return .mmio(try mmio(fields))
        case "kvm_userspace_exit": return .userspaceExit(try userspaceExit(fields))
        case "kvm_pio": return .pio(try pio(fields))
        case "kvm_emulate_insn": return .emulateInsn(try emulateInsn(fields))
        case "kvm_inj_exception": return .injException(try injException(fields))
        default: throw FieldError("no parser")
        }
    }

    static func tokens(_ s: Substring) -> [Substring] { s.split(whereSeparator: { $0 == " " || $0 == "\t" }) }

    /// Hexadecimal with or without "0x" (old formats print "%lx", "%llx" without it).
    static func hexValue(_ t: Substring?, _ what: String) throws(FieldError) -> UInt64 {
        guard var t else { throw FieldError("\(what): missing value") }
        if t.hasSuffix(",") { t = t.dropLast() }
        if t.hasPrefix("0x") || t.hasPrefix("0X") { t = t.dropFirst(2) }
        guard !t.isEmpty, t.count <= 16, let v = UInt64(t, radix: 16) else { throw FieldError("\(what): \"\(t)\" is not a hexadecimal number") }
        return v
    }
    static func hex32(_ t: Substring?, _ what: String) throws(FieldError) -> UInt32 {
        let v = try hexValue(t, what)
        guard v <= UInt64(UInt32.max) else { throw FieldError("\(what): \(v) does not fit 32 bits") }
        return UInt32(v)
    }
    static func decValue(_ t: Substring?, _ what: String) throws(FieldError) -> UInt64 {
        guard var t else { throw FieldError("\(what): missing value") }
        if t.hasSuffix(",") { t = t.dropLast() }
        guard let v = UInt64(t) else { throw FieldError("\(what): \"\(t)\" is not a decimal number") }
        return v
    }
    static func dec32(_ t: Substring?, _ what: String) throws(FieldError) -> UInt32 {
        let v = try decValue(t, what)
        guard v <= UInt64(UInt32.max) else { throw FieldError("\(what): \(v) does not fit 32 bits") }
        return UInt32(v)
    }
    /// A number as perf prints a raw field: decimal, or hexadecimal with 0x.
    static func anyNumber(_ t: Substring, _ what: String) throws(FieldError) -> UInt64 {
        if t.hasPrefix("0x") { return try hexValue(t, what) }
        if t.hasPrefix("-"), let v = Int64(t) { return UInt64(bitPattern: v) }
        return try decValue(t, what)
    }

    static func reason(_ name: String) -> (UInt32?, KVMISA?) {
        if let v = KVMExitReasons.vmx[name] { return (v, .vmx) }
        if let v = KVMExitReasons.svm[name] { return (v, .svm) }
        if name.hasPrefix("0x"), let v = UInt32(name.dropFirst(2), radix: 16) { return (v, nil) }
        return (nil, nil)
    }

    /// kvm_exit:
    ///   "reason %s rip 0x%lx"                                         (2.6.2x)
    ///   "reason %s rip 0x%lx info %llx %llx"                          (2.6.3x-5.x; %s%s%s with " FAILED_VMENTRY" from 4.x)
    ///   "vcpu %u reason %s rip 0x%lx info %llx %llx"                  (5.x)
    ///   "vcpu %u reason %s%s%s rip 0x%lx info1 0x%016llx info2 0x%016llx intr_info 0x%08x error_code 0x%08x"  (5.1x-6.x)
    ///   ... " requests 0x%016llx"                                     (6.1x, this machine's 6.18)
    static func exit(_ f: Substring) throws(FieldError) -> KVMExitEvent {
        let t = tokens(f)
        var i = 0
        var e = KVMExitEvent(vcpu: nil, reasonName: "", reasonNumber: nil, isa: nil, failedVMEntry: false, rip: 0)
        var sawReason = false, sawRip = false
        while i < t.count {
            let key = t[i]
            let next: Substring? = i + 1 < t.count ? t[i + 1] : nil
            switch key {
            case "vcpu": e.vcpu = try dec32(next, "vcpu"); i += 2
            case "reason":
                var j = i + 1
                var parts: [Substring] = []
                while j < t.count, t[j] != "rip" { parts.append(t[j]); j += 1 }
                guard let first = parts.first else { throw FieldError("reason: missing name") }
                e.reasonName = String(first)
                for p in parts.dropFirst() {
                    guard p == "FAILED_VMENTRY" else { throw FieldError("reason: unexpected \"\(p)\" after \(first)") }
                    e.failedVMEntry = true
                }
                (e.reasonNumber, e.isa) = reason(e.reasonName)
                sawReason = true
                i = j
            case "rip": e.rip = try hexValue(next, "rip"); sawRip = true; i += 2
            case "info":
                e.info1 = try hexValue(next, "info")
                e.info2 = try hexValue(i + 2 < t.count ? t[i + 2] : nil, "info (second value)")
                i += 3
            case "info1": e.info1 = try hexValue(next, "info1"); i += 2
            case "info2": e.info2 = try hexValue(next, "info2"); i += 2
            case "intr_info": e.intrInfo = try hex32(next, "intr_info"); i += 2
            case "error_code": e.errorCode = try hex32(next, "error_code"); i += 2
            case "requests": e.requests = try hexValue(next, "requests"); i += 2
            default: throw FieldError("unexpected \"\(key)\"")
            }
        }
        guard sawReason else { throw FieldError("no reason") }
        guard sawRip else { throw FieldError("no rip") }
        return e
    }

    /// kvm_entry: "vcpu %u" (to 5.x); "vcpu %u, rip 0x%lx" (5.x);
    /// "vcpu %u, rip 0x%lx intr_info 0x%08x error_code 0x%08x%s" ("[immediate exit]", 6.x).
    static func entry(_ f: Substring) throws(FieldError) -> KVMEntryEvent {
        var s = f
        var immediate = false
        if let r = s.firstRange(of: "[immediate exit]") {
            immediate = true
            s = Substring(String(s[s.startIndex..<r.lowerBound]) + " " + String(s[r.upperBound...]))
        }
        let t = tokens(s)
        var e = KVMEntryEvent(vcpu: 0, rip: nil, intrInfo: nil, errorCode: nil, immediateExit: immediate)
        var i = 0, sawVcpu = false
        while i < t.count {
            let next: Substring? = i + 1 < t.count ? t[i + 1] : nil
            switch t[i] {
            case "vcpu": e.vcpu = try dec32(next, "vcpu"); sawVcpu = true
            case "rip": e.rip = try hexValue(next, "rip")
            case "intr_info": e.intrInfo = try hex32(next, "intr_info")
            case "error_code": e.errorCode = try hex32(next, "error_code")
            default: throw FieldError("unexpected \"\(t[i])\"")
            }
            i += 2
        }
        guard sawVcpu else { throw FieldError("no vcpu") }
        return e
    }

    /// kvm_page_fault: "address %lx error_code %x" (to 5.x); "vcpu %u rip 0x%lx address 0x%016lx
    /// error_code 0x%lx" (5.1x); "... address 0x%016llx error_code 0x%llx" (6.x).
    static func pageFault(_ f: Substring) throws(FieldError) -> KVMPageFaultEvent {
        let t = tokens(f)
        var vcpu: UInt32?, rip: UInt64?, address: UInt64?, code: UInt64?
        var i = 0
        while i < t.count {
            let next: Substring? = i + 1 < t.count ? t[i + 1] : nil
            switch t[i] {
            case "vcpu": vcpu = try dec32(next, "vcpu")
            case "rip": rip = try hexValue(next, "rip")
            case "address": address = try hexValue(next, "address")
            case "error_code": code = try hexValue(next, "error_code")
            default: throw FieldError("unexpected \"\(t[i])\"")
            }
            i += 2
        }
        guard let address else { throw FieldError("no address") }
        guard let code else { throw FieldError("no error_code") }
        return KVMPageFaultEvent(vcpu: vcpu, rip: rip, address: address, errorCode: code)
    }

    /// kvm_mmio: "mmio %s len %u gpa 0x%llx val 0x%llx" (type unsatisfied-read, read, write).
    static func mmio(_ f: Substring) throws(FieldError) -> KVMMMIOEvent {
        let t = tokens(f)
        guard t.count == 8, t[0] == "mmio", t[2] == "len", t[4] == "gpa", t[6] == "val" else {
            throw FieldError("expected \"mmio TYPE len N gpa 0x.. val 0x..\"")
        }
        let kind: KVMMMIOEvent.Kind
        switch t[1] {
        case "unsatisfied-read", "0x0": kind = .unsatisfiedRead
        case "read", "0x1": kind = .read
        case "write", "0x2": kind = .write
        default: throw FieldError("unknown mmio type \"\(t[1])\"")
        }
        return KVMMMIOEvent(kind: kind, length: try dec32(t[3], "len"), gpa: try hexValue(t[5], "gpa"), value: try hexValue(t[7], "val"))
    }

    /// kvm_userspace_exit: "reason %s (%d)".
    static func userspaceExit(_ f: Substring) throws(FieldError) -> KVMUserspaceExitEvent {
        let t = tokens(f)
        guard t.count == 3, t[0] == "reason", t[2].hasPrefix("("), t[2].hasSuffix(")") else {
            throw FieldError("expected \"reason NAME (N)\"")
        }
        guard let n = Int64(t[2].dropFirst().dropLast()) else { throw FieldError("\"\(t[2])\" is not a number in parentheses") }
        var name = String(t[1])
        if name.hasPrefix("KVM_EXIT_") {
            let bare = String(name.dropFirst("KVM_EXIT_".count))
            if let idx = KVMUserspaceReasons.names.firstIndex(of: bare), idx != Int(n) {
                throw FieldError("\(name) is KVM exit reason \(idx), the line says \(n)")
            }
        } else if name != "restart" && name != "error" {
            guard name.hasPrefix("0x") else { throw FieldError("unknown reason \"\(name)\"") }
            name = String(t[1])
        }
        return KVMUserspaceExitEvent(reasonName: name, number: n)
    }

    /// kvm_pio: "pio_%s at 0x%x size %d count %d" (to 4.x); "... val 0x%x %s" ("(...)" when count > 1).
    static func pio(_ f: Substring) throws(FieldError) -> KVMPIOEvent {
        let t = tokens(f)
        guard t.count >= 7, t[1] == "at", t[3] == "size", t[5] == "count" else {
            throw FieldError("expected \"pio_read|pio_write at 0x.. size N count N [val 0x..]\"")
        }
        let write: Bool
        switch t[0] {
        case "pio_write": write = true
        case "pio_read": write = false
        default: throw FieldError("unknown direction \"\(t[0])\"")
        }
        var e = KVMPIOEvent(write: write, port: try hex32(t[2], "port"), size: try dec32(t[4], "size"), count: try dec32(t[6], "count"), value: nil)
        if t.count > 7 {
            guard t[7] == "val", t.count >= 9 else { throw FieldError("unexpected \"\(t[7])\"") }
            e.value = try hex32(t[8], "val")
            guard t.count == 9 || (t.count == 10 && t[9] == "(...)") else { throw FieldError("unexpected \"\(t[9])\"") }
        }
        return e
    }

    /// kvm_emulate_insn: "%x:%llx:%s (%s)%s" -> "0:b000:e6 e0 (prot64)", " failed" when it failed;
    /// trace-cmd's kvm plugin prints "0:b000: e6 e0" (no mode) and " FAIL" when it failed.
    static func emulateInsn(_ f: Substring) throws(FieldError) -> KVMEmulateInsnEvent {
        let parts = f.split(separator: ":", maxSplits: 2, omittingEmptySubsequences: false)
        guard parts.count == 3 else { throw FieldError("expected \"CSBASE:RIP:BYTES (MODE)\"") }
        var rest = parts[2]
        var failed = false
        var r = rest
        while let l = r.last, l == " " { r.removeLast() }
        if r.hasSuffix(" failed") || r == "failed" { failed = true; r = r.dropLast(6); while let l = r.last, l == " " { r.removeLast() } }
        if r.hasSuffix(" FAIL") { failed = true; r = r.dropLast(5); while let l = r.last, l == " " { r.removeLast() } }
        var mode: String?
        if r.hasSuffix(")"), let open = r.lastIndex(of: "(") {
            mode = String(r[r.index(after: open)..<r.index(before: r.endIndex)])
            r = r[..<open]
        }
        rest = r
        var bytes: [UInt8] = []
        for b in tokens(rest) {
            guard b.count == 2, let v = UInt8(b, radix: 16) else { throw FieldError("instruction byte \"\(b)\" is not two hex digits") }
            bytes.append(v)
        }
        return KVMEmulateInsnEvent(csBase: try hexValue(parts[0], "cs base"), rip: try hexValue(parts[1], "rip"), bytes: bytes,
                                   mode: mode, failed: failed)
    }

    /// kvm_inj_exception: "#PF", "#GP (0x0)", "#BP [reinjected]".
    static func injException(_ f: Substring) throws(FieldError) -> KVMInjExceptionEvent {
        var t = tokens(f)
        var reinjected = false
        if t.last == "[reinjected]" { reinjected = true; t.removeLast() }
        guard let first = t.first, first.hasPrefix("#") else { throw FieldError("expected \"#XX\"") }
        let mnemonic = first.dropFirst()
        var vector: UInt32
        if let v = KVMExceptions.vectors[String(mnemonic)] { vector = v } else {
            guard mnemonic.hasPrefix("0x"), let v = UInt32(mnemonic.dropFirst(2), radix: 16) else {
                throw FieldError("unknown exception \"\(first)\"")
            }
            vector = v
        }
        var code: UInt64?
        if t.count == 2 {
            guard t[1].hasPrefix("("), t[1].hasSuffix(")") else { throw FieldError("unexpected \"\(t[1])\"") }
            code = try hexValue(t[1].dropFirst().dropLast(), "error code")
        } else if t.count > 2 {
            throw FieldError("unexpected \"\(t[2])\"")
        }
        return KVMInjExceptionEvent(vector: vector, errorCode: code, reinjected: reinjected)
    }

    /// perf's "[FAILED TO PARSE] name=value ..." with the tracepoints' TP_STRUCT field names.
    static func raw(name: String, _ f: Substring) throws(FieldError) -> KernelEvent {
        var kv: [String: UInt64] = [:]
        for tok in tokens(f) {
            guard let eq = tok.firstIndex(of: "=") else { throw FieldError("raw field \"\(tok)\" is not name=value") }
            kv[String(tok[..<eq])] = try anyNumber(tok[tok.index(after: eq)...], String(tok[..<eq]))
        }
        func need(_ k: String) throws(FieldError) -> UInt64 {
            guard let v = kv[k] else { throw FieldError("raw fields: no \(k)") }
            return v
        }
        switch name {
        case "kvm_exit":
            let isa: KVMISA? = kv["isa"].map { $0 == 1 ? .vmx : .svm }
            let r = UInt32(truncatingIfNeeded: try need("exit_reason"))
            let basic = isa == .vmx ? r & 0xFFFF : r
            let table = isa == .vmx ? KVMExitReasons.vmx : KVMExitReasons.svm
            let nm = table.first { $0.value == basic }?.key ?? "0x" + String(basic, radix: 16)
            return .exit(KVMExitEvent(vcpu: kv["vcpu_id"].map { UInt32(truncatingIfNeeded: $0) }, reasonName: nm,
                                      reasonNumber: basic, isa: isa, failedVMEntry: isa == .vmx && r & 0x8000_0000 != 0,
                                      rip: try need("guest_rip"), info1: kv["info1"], info2: kv["info2"],
                                      intrInfo: kv["intr_info"].map { UInt32(truncatingIfNeeded: $0) },
                                      errorCode: kv["error_code"].map { UInt32(truncatingIfNeeded: $0) }, requests: kv["requests"]))
        case "kvm_inj_exception":
            return .injException(KVMInjExceptionEvent(vector: UInt32(truncatingIfNeeded: try need("exception")),
                                                      errorCode: kv["has_error"] == 1 ? kv["error_code"] : nil,
                                                      reinjected: kv["reinjected"].map { $0 != 0 } ?? false))
        case "kvm_page_fault":
            return .pageFault(KVMPageFaultEvent(vcpu: kv["vcpu_id"].map { UInt32(truncatingIfNeeded: $0) }, rip: kv["guest_rip"],
                                                address: try need("fault_address"), errorCode: try need("error_code")))
        default:
            throw FieldError("raw fields of \(name) are not read (only kvm_exit, kvm_page_fault, kvm_inj_exception)")
        }
    }
}

/// Reads a text file line by line with a fixed buffer (O(1) memory in the file's length).
package struct LineReader {
    package static func forEachLine(path: String, _ body: (Substring) throws -> Void) throws {
        let src = try FileTraceSource(path: path)
        var buf = [UInt8](repeating: 0, count: 1 << 16)
        var carry: [UInt8] = []
        while true {
            let n = try buf.withUnsafeMutableBytes { b throws -> Int in try src.read(into: b) }
            if n == 0 { break }
            var start = 0
            for i in 0..<n where buf[i] == 0x0A {
                carry.append(contentsOf: buf[start..<i])
                try body(Substring(String(decoding: carry, as: UTF8.self)))
                carry.removeAll(keepingCapacity: true)
                start = i + 1
            }
            carry.append(contentsOf: buf[start..<n])
            if carry.count > 1 << 20 { throw KernelTraceError(line: 0, "a line longer than 1 MiB", text: "") }
        }
        if !carry.isEmpty { try body(Substring(String(decoding: carry, as: UTF8.self))) }
    }
}
