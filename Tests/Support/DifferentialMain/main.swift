import NPTCore
import NPTDifferential
#if canImport(Glibc)
import Glibc
#endif

/// `nptkit-differential [--steps N] [--seed S] [--threads]`: the differential test of the MBEC
/// emulation against the SDM reference model, for long runs (the test command runs 2 million steps;
/// this runs as many as asked, spread over every configuration). Exit status 1 on an unclassified
/// divergence, with the first ones printed.
var steps = 2_000_000
var seed: UInt64 = 1
var only: Int?
var args = CommandLine.arguments.dropFirst()
while let a = args.popFirst() {
    switch a {
    case "--steps": steps = Int(args.popFirst() ?? "") ?? steps
    case "--seed": seed = UInt64(args.popFirst() ?? "") ?? seed
    case "--part": only = Int(args.popFirst() ?? "")
    default:
        print("usage: nptkit-differential [--steps N] [--seed S] [--part K]")
        for (i, p) in DifferentialSuite.parts.enumerated() { print("  part \(i): \(p.name)") }
        exit(2)
    }
}
let start = Monitor.now()
let report = try DifferentialSuite.run(totalSteps: steps, seed: seed, only: only) { line in print(line) }
let secs = Double(Monitor.now() - start) / 1e9
print("total: \(report.summary)")
print("steps per second: \(Int(Double(report.steps) / secs)) (\(report.steps) steps in \(Int(secs)) s)")
if !report.unclassified.isEmpty {
    print("UNCLASSIFIED divergences (\(report.unclassified.count)); the first:")
    for u in report.unclassified.prefix(10) { print("  " + u) }
    exit(1)
}
