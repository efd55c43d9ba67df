import NPTCore
import Synchronization
import NPTHost

/// The configurations of the differential test and their share of the steps.
package enum DifferentialSuite {
    package struct Part: Sendable {
        package var config: DifferentialConfig
        package var share: Double
        package var threaded: Bool
        package var name: String { config.name + (threaded ? " threaded" : "") }
    }

    package static let parts: [Part] = [
        Part(config: DifferentialConfig(mode: .exact, smep: true), share: 0.34, threaded: false),
        Part(config: DifferentialConfig(mode: .exact, smep: false), share: 0.08, threaded: false),
        Part(config: DifferentialConfig(mode: .lazy, smep: true), share: 0.10, threaded: false),
        Part(config: DifferentialConfig(mode: .lazy, smep: false), share: 0.04, threaded: false),
        Part(config: DifferentialConfig(mode: .lazy, smep: true, withoutExits: .exitOnReturn), share: 0.05, threaded: false),
        Part(config: DifferentialConfig(mode: .violationOnly, smep: true, withoutExits: [.exitOnEscalation, .exitOnReturn]),
             share: 0.10, threaded: false),
        Part(config: DifferentialConfig(mode: .violationOnly, smep: false, withoutExits: [.exitOnEscalation, .exitOnReturn]),
             share: 0.04, threaded: false),
        Part(config: DifferentialConfig(mode: .exact, smep: true), share: 0.18, threaded: true),
        Part(config: DifferentialConfig(mode: .lazy, smep: true), share: 0.04, threaded: true),
        Part(config: DifferentialConfig(mode: .violationOnly, smep: true, withoutExits: [.exitOnEscalation, .exitOnReturn]),
             share: 0.03, threaded: true),
    ]

    package static let stepsPerEpisode = 4000

    /// Runs every part's share of `totalSteps`, episodes spread over two worker threads. Returns the
    /// reports per part (in `parts` order).
    package static func runParts(totalSteps: Int, seed: UInt64, only: Int? = nil) throws -> [DifferentialReport] {
        struct Job: Sendable { var part: Int; var seed: UInt64; var steps: Int }
        var jobs: [Job] = []
        for (i, p) in parts.enumerated() where only == nil || only == i {
            let steps = only == nil ? Int(Double(totalSteps) * p.share) : totalSteps
            if p.threaded {
                // 3 vCPU threads of `per` steps + a creator running 40 steps per created vCPU
                // (per / 200 of them): about 3.2 per steps a job.
                let total = Double(steps) / 3.2
                let jobsNeeded = max(1, Int((total / 6000).rounded(.up)))
                let per = max(200, (Int(total) + jobsNeeded - 1) / jobsNeeded)
                for e in 0..<jobsNeeded {
                    jobs.append(Job(part: i, seed: seed &* 1_000_003 &+ UInt64(i * 7919 + e), steps: per))
                }
            } else {
                let n = max(1, Int((Double(steps) / Double(stepsPerEpisode)).rounded(.up)))
                for e in 0..<n { jobs.append(Job(part: i, seed: seed &* 1_000_003 &+ UInt64(i * 7919 + e), steps: max(1, (steps + n - 1) / n))) }
            }
        }
        let queue = Mutex(jobs)
        let results = Mutex([DifferentialReport](repeating: DifferentialReport(), count: parts.count))
        let workers = (0..<2).map { _ in
            HostThread {
                while let job = queue.withLock({ $0.popLast() }) {
                    let p = parts[job.part]
                    var r: DifferentialReport
                    do {
                        r = p.threaded
                            ? try Differential.threaded(p.config, seed: job.seed, vcpus: 3, stepsPerVCPU: job.steps,
                                                        creations: max(4, job.steps / 200))
                            : try Differential.episode(p.config, seed: job.seed, steps: job.steps)
                    } catch {
                        r = DifferentialReport()
                        r.unclassified.append("\(p.name) seed \(job.seed): \(error)")
                    }
                    results.withLock { $0[job.part].add(r) }
                }
            }
        }
        for w in workers { w.join() }
        return results.withLock { $0 }
    }

    /// Runs the suite and returns the total; `log` gets a line per part.
    package static func run(totalSteps: Int, seed: UInt64, only: Int? = nil, log: (String) -> Void) throws -> DifferentialReport {
        let reports = try runParts(totalSteps: totalSteps, seed: seed, only: only)
        var total = DifferentialReport()
        for (i, (p, r)) in zip(parts, reports).enumerated() where only == nil || only == i {
            log("\(p.name): \(r.summary)")
            total.add(r)
        }
        return total
    }
}
