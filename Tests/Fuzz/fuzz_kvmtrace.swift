// libFuzzer target `kvmtrace`: kernel KVM tracepoint text (tracefs trace / trace_pipe, trace-cmd
// report, perf script) through NPTTrace.KernelTraceParser, line by line as `nptkit-cli whatif` reads
// it, every event fed to the what-if exit stream; and a what-if policy file through
// WhatIfPolicy.parse. Built by scripts/fuzz.sh with swiftc -sanitize=fuzzer,address against
// NPTTrace's sources.
//
// Input: POLICY NUL TRACE, or TRACE alone (then the seed corpus's policy for the real captures).
// Promises checked: an error names the line it is on (1 ... the lines given); parsed events never
// outnumber lines; a policy error names a line of the policy.
import NPTTrace

@inline(__always) private func check(_ ok: Bool, _ what: @autoclosure () -> String) {
    if !ok { fatalError("fuzz kvmtrace: broken promise: \(what())") }
}

private let defaultPolicy = try! WhatIfPolicy.parse("""
    kernel 0x0 0x10000
    0x8000 0x1000 R|Xs
    0xB000 0x1000 R|Xs
    0x10000 0x1000 R|Xu
    """)

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzKernelTrace(_ data: UnsafePointer<UInt8>?, _ size: Int) -> CInt {
    guard let data, size > 0 else { return 0 }
    let all = UnsafeBufferPointer(start: data, count: size)
    var policy = defaultPolicy
    var trace = all[...]
    if let nul = all.firstIndex(of: 0) {
        let text = String(decoding: all[..<nul], as: UTF8.self)
        let policyLines = text.split(separator: "\n", omittingEmptySubsequences: false).count
        do throws(WhatIfInputError) {
            policy = try WhatIfPolicy.parse(text, file: "fuzz")
        } catch {
            check(error.line >= 1 && error.line <= policyLines, "policy error on line \(error.line) of \(policyLines): \(error)")
            return 0
        }
        trace = all[(nul + 1)...]
    }
    var parser = KernelTraceParser(unknownEvents: data[0] & 1 == 0 ? .skip : .error)
    var stream = KernelExitStream(policy: policy, mode: .exact)
    var lines = 0, events = 0
    // As LineReader.forEachLine: split at '\n', each line decoded as UTF-8 (invalid bytes replaced).
    for raw in trace.split(separator: 0x0A, omittingEmptySubsequences: false) {
        lines += 1
        do throws(KernelTraceError) {
            if let ev = try parser.parse(Substring(String(decoding: raw, as: UTF8.self))) {
                events += 1
                stream.feed(ev)
            }
        } catch {
            check(error.line == lines, "error on line \(error.line), the parser was given \(lines): \(error)")
            break
        }
        check(events <= lines, "\(events) events from \(lines) lines")
    }
    stream.finish()
    _ = stream.exitModel.total
    return 0
}
