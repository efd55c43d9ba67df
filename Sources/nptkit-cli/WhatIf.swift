import ArgumentParser
import NPTTrace

/// `nptkit whatif TRACE --policy FILE`: what emulated MBEC would add on a real exit stream
/// (the model is NPTTrace's WhatIfModel; this command only reads the files and prints the report).
struct WhatIf: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "whatif",
        abstract: "Estimate what emulated MBEC would add (exits, switches, violations, time) on a kernel trace or an NPTKit trace.")
    @Argument(help: "A kernel trace (tracefs trace/trace_pipe, trace-cmd report or perf script text) or an NPTKit trace.")
    var trace: String
    @Option(help: "The policy: lines `GPA SIZE PERMS` (PERMS like R|W|Xs|Xu), `default PERMS`, `map GVA SIZE GPA`, `kernel START END`; # comments (docs/trace-format.md).")
    var policy: String
    @Option(help: "MBEC emulation mode: exact, lazy or violation-only.")
    var mode: String = "exact"
    @Option(help: "Costs file: `exit_ns N`, `switch_ns N` (default: the KVM backend's figures in the README).")
    var costs: String?
    @Flag(help: "Refuse events the parser does not read (default: skip and count them).")
    var strict = false

    func run() throws {
        guard let m = WhatIfMode(rawValue: mode) else {
            throw ValidationError("--mode \(mode): use \(WhatIfMode.allCases.map(\.rawValue).joined(separator: ", "))")
        }
        let p = try WhatIfPolicy.parse(try readText(policy), file: policy)
        let c = try costs.map { try WhatIfCosts.parse(try readText($0), file: $0) } ?? WhatIfCosts.kvmBuildMachine
        let report = try WhatIfAnalysis.run(tracePath: trace, policy: p, policyPath: policy, mode: m, costs: c,
                                            unknownEvents: strict ? .error : .skip)
        print(report.render())
    }
}

/// A whole text file (policy and costs files are small).
func readText(_ path: String) throws -> String {
    let src = try FileTraceSource(path: path)
    var out: [UInt8] = []
    var buf = [UInt8](repeating: 0, count: 65536)
    while true {
        let n = try buf.withUnsafeMutableBytes { try src.read(into: $0) }
        if n == 0 { break }
        out.append(contentsOf: buf[0..<n])
        if out.count > 64 << 20 { throw ValidationError("\(path): larger than 64 MiB") }
    }
    return String(decoding: out, as: UTF8.self)
}

/// `nptkit trace-dump FILE`: every record of an NPTKit trace, one a line (number, byte offset,
/// timestamp, record); a damaged trace ends with the error and its byte offset, exit status 1.
struct TraceDump: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "trace-dump", abstract: "Print the records of an NPTKit trace (docs/trace-format.md).")
    @Argument(help: "An NPTKit trace file.")
    var trace: String

    func run() throws {
        let r = try TraceReader(path: trace)
        print("NPTKit trace \(r.major).\(r.minor): \(trace)")
        do {
            while let e = try r.next() { print("#\(e.index) @\(e.offset) \(e.timestamp) ns: \(e.record)") }
        } catch {
            print("error: \(error)")
            throw ExitCode(1)
        }
        if r.skippedUnknown > 0 { print("(\(r.skippedUnknown) records of kinds this version does not know, skipped)") }
        if r.exitPathRecords > 0 {
            print("(\(r.exitPathRecords) exit-path records, each shown as the 2 to 4 records it stands for, at its byte offset)")
        }
    }
}
