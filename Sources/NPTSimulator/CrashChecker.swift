import NPTCore
import Synchronization

/// Checks crash consistency: it follows every persistence event of a run, keeps, by the documented
/// protocol, which stores are durable (a store by CPU c becomes durable when c, after it, wrote its
/// line back, fenced, and then completed a write to the vFHA), and after every event (each one a
/// possible crash point: nothing else changes persistent state) computes what a power failure would
/// leave on the media and compares.
package final class CrashChecker: @unchecked Sendable {
    package struct Loss: Sendable, Equatable, CustomStringConvertible {
        package var crashPoint: Int
        package var spa: UInt64
        package var expected: UInt64
        package var found: UInt64
        package var description: String { "crash point \(crashPoint): spa \(hex(spa)) holds \(hex(found)), durable value \(hex(expected))" }
    }
    package struct Report: Sendable {
        package var crashPoints = 0
        /// (crash point, durable store) pairs checked.
        package var checks = 0
        package var durableStores = 0
        package var losses: [Loss] = []
    }

    private struct CPU { var stored: [(UInt64, UInt64)] = []; var writtenBack: [(UInt64, UInt64)] = []; var fenced: [(UInt64, UInt64)] = [] }
    private struct State {
        var cpus: [ObjectIdentifier: CPU] = [:]
        var durable: [UInt64: UInt64] = [:]
        var later: [UInt64: Set<UInt64>] = [:]
        var report = Report()
    }
    private let state = NPTMutex(State())
    private let platform: PersistentPlatform

    package init(platform: PersistentPlatform) {
        self.platform = platform
        platform.observe { [weak self] cpu, e in self?.event(cpu, e) }
        check()
    }

    package func stop() -> Report {
        platform.observe(nil)
        return state.withLock { $0.report }
    }

    private func event(_ cpu: ObjectIdentifier?, _ e: PersistenceEvent) {
        state.withLock { s in
            guard let cpu else { return }
            var c = s.cpus[cpu] ?? CPU()
            switch e {
            case .store(let spa, let v):
                c.stored.append((spa, v))
                if s.durable[spa] != nil { s.later[spa, default: []].insert(v) }
            case .writeBack(let spa):
                let l = spa & ~63
                c.writtenBack += c.stored.filter { $0.0 & ~63 == l }
                c.stored.removeAll { $0.0 & ~63 == l }
            case .fence:
                c.fenced += c.writtenBack
                c.writtenBack.removeAll()
            case .flushHintWrite:
                for (spa, v) in c.fenced {
                    if s.durable[spa] == nil { s.report.durableStores += 1 }
                    s.durable[spa] = v
                    s.later[spa] = []
                }
                c.fenced.removeAll()
            case .physicalFlush:
                break
            }
            s.cpus[cpu] = c
        }
        check()
    }

    /// One crash point: what would survive a power failure now. The media is read under the
    /// checker's lock, so a store another CPU marks durable is never checked against a snapshot
    /// taken before that CPU's flush (lock order: checker, then platform; events are emitted
    /// outside the platform's lock).
    private func check() {
        state.withLock { s in
            let media = platform.survivingMedia()
            let point = s.report.crashPoints
            s.report.crashPoints += 1
            for (spa, v) in s.durable {
                s.report.checks += 1
                let found = PersistentPlatform.read64(media, spa)
                if found != v && !(s.later[spa]?.contains(found) ?? false) {
                    s.report.losses.append(Loss(crashPoint: point, spa: spa, expected: v, found: found))
                }
            }
        }
    }
}
