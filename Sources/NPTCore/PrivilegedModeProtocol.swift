/// The privileged-mode (SMM-like) entry protocol as one transition system over CPU agents.
///
/// The same transition code runs in two places: the threaded runtime (`PrivilegedModeCoordinator`)
/// takes each transition under one lock on behalf of a real vCPU thread, and the exhaustive checker
/// (`PMExplorer`) enumerates every interleaving of them for small CPU counts. What is checked is
/// therefore the code that runs.
///
/// Order of the steps. The special region is added to the global view only once every other CPU has
/// stopped, and removed (with every translation that could reach it) before the entering CPU leaves
/// the mode and before anyone resumes. Adding the region first and stopping the others afterwards,
/// as the wording lists the steps, would let other CPUs run while the region is visible, which
/// is the very thing the invariant forbids; the checkers reject that order (`.mapBeforeStopped`).
package struct PMState: Hashable, Sendable, CustomStringConvertible {
    package enum Phase: UInt8, Hashable, Sendable {
        /// Running guest code (outside the mode).
        case running
        /// Has an enter-mode request queued and waits for its turn; runs no guest code.
        case waiting
        /// Halted by the mode's holder; accepts only the enter-mode interrupt.
        case stopped
        /// Holds the mode lock and waits for the others to stop.
        case coordinating
        /// In the privileged mode, running the region's code.
        case inMode
        /// Left the mode: region removed and translations flushed; resumes the others next.
        case leaving
    }
    package var phase: [Phase]
    package var stopRequested: [Bool]
    /// Enter-mode interrupts raised for each CPU and not yet queued.
    package var pending: [UInt32]
    /// Other interrupts that arrived while stopped; delivered after the CPU resumes.
    package var deferred: [UInt32]
    /// CPUs with a queued request, in arrival order. (Slot numbers: 32 bits, for any vCPU count a
    /// VM allows; they were 8 bits and a VM's 128th vCPU overflowed them.)
    package var queue: [UInt32]
    package var holder: Int32
    /// The region is part of the global view.
    package var visible: Bool
    /// Some translation cached by the CPU reaches the region.
    package var reachesRegion: [Bool]
    package var raised: UInt32 = 0
    package var served: UInt32 = 0
    package var failed: UInt32 = 0

    package init(cpus: Int) {
        phase = Array(repeating: .running, count: cpus)
        stopRequested = Array(repeating: false, count: cpus)
        pending = Array(repeating: 0, count: cpus)
        deferred = Array(repeating: 0, count: cpus)
        reachesRegion = Array(repeating: false, count: cpus)
        queue = []
        holder = -1
        visible = false
    }

    package var cpus: Int { phase.count }
    package var description: String {
        "phase \(phase) stop \(stopRequested.map { $0 ? 1 : 0 }) pending \(pending) queue \(queue) holder \(holder) visible \(visible) reach \(reachesRegion.map { $0 ? 1 : 0 }) raised \(raised) served \(served) failed \(failed)"
    }
    func isHolder(_ i: Int) -> Bool { Int(holder) == i }
}

/// One atomic step of a CPU agent (or of the world, for `.raise`).
package enum PMAction: Hashable, Sendable, CustomStringConvertible {
    /// An enter-mode interrupt arrives for the CPU (from any source, at any time).
    case raise(Int)
    /// Another interrupt arrives for the CPU.
    case otherInterrupt(Int)
    /// The CPU runs one guest instruction (outside the mode, or the region's code inside it).
    case execute(Int)
    /// The CPU acknowledges a stop request and halts.
    case acceptStop(Int)
    /// The CPU queues its pending enter-mode request.
    case queueRequest(Int)
    /// The first queued CPU takes the mode lock and asks every other CPU to stop.
    case beginEntry(Int)
    /// Every other CPU has stopped: add the region to the view, enter the mode.
    case enter(Int)
    /// A CPU did not stop within the bound: the request fails, the view unchanged, all resume.
    case timeout(Int)
    /// RSM: remove the region from the view and flush every translation that could reach it.
    case leave(Int)
    /// Release the lock and resume the others; if requests are queued, hand over instead: the next
    /// requester proceeds and everyone else stays stopped (no resume-then-stop round trip).
    case release(Int)
    /// A stopped CPU resumes when it is no longer asked to stop; deferred interrupts are delivered.
    case resume(Int)

    package var cpu: Int {
        switch self {
        case .raise(let i), .otherInterrupt(let i), .execute(let i), .acceptStop(let i), .queueRequest(let i),
             .beginEntry(let i), .enter(let i), .timeout(let i), .leave(let i), .release(let i), .resume(let i): i
        }
    }
    package var description: String {
        switch self {
        case .raise(let i): "raise(\(i))"
        case .otherInterrupt(let i): "irq(\(i))"
        case .execute(let i): "execute(\(i))"
        case .acceptStop(let i): "acceptStop(\(i))"
        case .queueRequest(let i): "queue(\(i))"
        case .beginEntry(let i): "beginEntry(\(i))"
        case .enter(let i): "enter(\(i))"
        case .timeout(let i): "timeout(\(i))"
        case .leave(let i): "leave(\(i))"
        case .release(let i): "release(\(i))"
        case .resume(let i): "resume(\(i))"
        }
    }
}

/// Deliberately broken variants, for showing that the checkers catch each mistake.
package enum PMVariant: String, Sendable, CaseIterable {
    case correct
    /// The listed order: add the region before the others have stopped.
    case mapBeforeStopped
    /// Resume the others before the region is removed.
    case resumeBeforeUnmap
    /// Remove the region but keep cached translations.
    case noFlushOnLeave
}

package enum PMProtocol {
    /// Whether `a` may be taken in `s`.
    package static func enabled(_ a: PMAction, in s: PMState, variant: PMVariant = .correct) -> Bool {
        let i = a.cpu
        switch a {
        case .raise, .otherInterrupt:
            return true
        case .execute:
            // A stop request is asynchronous: the CPU runs until it acknowledges it.
            return (s.phase[i] == .running && s.pending[i] == 0) || s.phase[i] == .inMode
        case .acceptStop:
            return s.phase[i] == .running && s.stopRequested[i]
        case .queueRequest:
            return s.pending[i] > 0 && (s.phase[i] == .running || s.phase[i] == .stopped)
                && !s.queue.contains(UInt32(i))
        case .beginEntry:
            return s.holder < 0 && s.queue.first == UInt32(i)
                && (s.phase[i] == .waiting || (s.phase[i] == .stopped && !s.stopRequested[i]))
        case .enter:
            guard s.phase[i] == .coordinating else { return false }
            return variant == .mapBeforeStopped || allOthersStopped(s, i)
        case .timeout:
            return s.phase[i] == .coordinating && !allOthersStopped(s, i)
        case .leave:
            return s.phase[i] == .inMode
        case .release:
            return s.phase[i] == .leaving
        case .resume:
            return s.phase[i] == .stopped && !s.stopRequested[i] && !s.queue.contains(UInt32(i))
        }
    }

    static func allOthersStopped(_ s: PMState, _ i: Int) -> Bool {
        (0..<s.cpus).allSatisfy { $0 == i || s.phase[$0] == .stopped || s.phase[$0] == .waiting }
    }

    /// Applies `a` (which must be enabled).
    package static func apply(_ a: PMAction, to s: inout PMState, variant: PMVariant = .correct) {
        let i = a.cpu
        switch a {
        case .raise:
            s.pending[i] += 1
            s.raised += 1
        case .otherInterrupt:
            // Outside the stop state it is taken at once; while stopped it waits.
            if s.phase[i] == .stopped || s.phase[i] == .waiting { s.deferred[i] += 1 }
        case .execute:
            if s.phase[i] == .inMode { s.reachesRegion[i] = true }
        case .acceptStop:
            s.phase[i] = .stopped
        case .queueRequest:
            s.pending[i] -= 1
            s.queue.append(UInt32(i))
            if s.phase[i] == .running { s.phase[i] = .waiting }
        case .beginEntry:
            s.holder = Int32(i)
            s.phase[i] = .coordinating
            for j in 0..<s.cpus where j != i { s.stopRequested[j] = true }
        case .enter:
            s.visible = true
            s.phase[i] = .inMode
        case .timeout:
            for j in 0..<s.cpus { s.stopRequested[j] = false }
            s.holder = -1
            s.queue.removeFirst()
            s.failed += 1
            s.phase[i] = .running
            s.deferred[i] = 0
        case .leave:
            s.phase[i] = .leaving
            if variant == .resumeBeforeUnmap {
                for j in 0..<s.cpus { s.stopRequested[j] = false }
                return
            }
            s.visible = false
            if variant != .noFlushOnLeave { for j in 0..<s.cpus { s.reachesRegion[j] = false } }
        case .release:
            if variant == .resumeBeforeUnmap {
                s.visible = false
                for j in 0..<s.cpus { s.reachesRegion[j] = false }
            }
            s.holder = -1
            s.queue.removeFirst()
            if let next = s.queue.first {
                for j in 0..<s.cpus { s.stopRequested[j] = j != Int(next) }
            } else {
                for j in 0..<s.cpus { s.stopRequested[j] = false }
            }
            s.served += 1
            s.phase[i] = .running
            s.deferred[i] = 0
        case .resume:
            s.phase[i] = .running
            s.deferred[i] = 0
        }
    }

    /// The security invariant; nil when it holds, else what is broken.
    package static func violation(in s: PMState) -> String? {
        var inMode = 0
        for j in 0..<s.cpus {
            let outside = !(s.isHolder(j) && s.phase[j] == .inMode)
            if s.phase[j] == .inMode {
                inMode += 1
                if !s.visible { return "CPU \(j) is in the mode but the region is not visible" }
            }
            if s.visible && outside && s.phase[j] == .running {
                return "CPU \(j) can run outside the mode while the region is visible"
            }
            if s.phase[j] == .running && s.deferred[j] != 0 {
                return "CPU \(j) runs with an interrupt still deferred"
            }
            if outside && s.reachesRegion[j] && s.phase[j] != .leaving {
                return "CPU \(j) holds a translation to the region outside the mode"
            }
            if !s.visible && s.reachesRegion[j] && s.phase[j] != .inMode {
                return "a translation to the region survives its removal (CPU \(j))"
            }
        }
        if inMode > 1 { return "\(inMode) CPUs are in the mode at once" }
        return nil
    }

    /// Every action of CPU `i` (and of the world towards it).
    package static func actions(cpu i: Int) -> [PMAction] {
        [.execute(i), .acceptStop(i), .queueRequest(i), .beginEntry(i), .enter(i), .timeout(i),
         .leave(i), .release(i), .resume(i)]
    }
}
