import NPTCore

/// Enumerates every interleaving of the privileged-mode protocol for a few CPUs (a deterministic
/// scheduler that tries every choice), checking the security invariant in every reachable state,
/// that no state is stuck, and that from every state all requests can still complete.
package struct PMExplorer: Sendable {
    package let cpus: Int
    package let maxRequests: Int
    package let maxOtherInterrupts: Int
    /// Whether a coordinator may give up on a CPU that has not stopped (the bounded wait).
    package let allowTimeouts: Bool
    package let variant: PMVariant

    package init(cpus: Int, maxRequests: Int, maxOtherInterrupts: Int = 1, allowTimeouts: Bool, variant: PMVariant = .correct) {
        self.cpus = cpus; self.maxRequests = maxRequests; self.maxOtherInterrupts = maxOtherInterrupts
        self.allowTimeouts = allowTimeouts; self.variant = variant
    }

    package struct Report: Sendable {
        package var states = 0
        package var transitions = 0
        /// The first invariant violation, with the schedule that reaches it.
        package var violation: (message: String, trace: [PMAction])?
        /// A reachable state from which the requests can no longer all complete.
        package var stuck: (state: PMState, trace: [PMAction])?
        package var quiescentStates = 0
        package var maxServed = 0
    }

    struct Node: Hashable { var s: PMState; var irqs: UInt8 }

    func successors(_ n: Node) -> [(PMAction, Node)] {
        var out: [(PMAction, Node)] = []
        for i in 0..<cpus {
            var acts = PMProtocol.actions(cpu: i)
            if Int(n.s.raised) < maxRequests { acts.append(.raise(i)) }
            if Int(n.irqs) < maxOtherInterrupts { acts.append(.otherInterrupt(i)) }
            for a in acts {
                if case .timeout = a, !allowTimeouts { continue }
                guard PMProtocol.enabled(a, in: n.s, variant: variant) else { continue }
                var m = n
                PMProtocol.apply(a, to: &m.s, variant: variant)
                if case .otherInterrupt = a { m.irqs += 1 }
                if m == n { continue } // e.g. execute outside the mode: no state change
                out.append((a, m))
            }
        }
        return out
    }

    static func quiescent(_ s: PMState) -> Bool {
        s.holder < 0 && s.queue.isEmpty && s.pending.allSatisfy { $0 == 0 }
            && s.phase.allSatisfy { $0 == .running } && Int(s.served) + Int(s.failed) == Int(s.raised)
    }

    package func run() -> Report {
        var report = Report()
        let start = Node(s: PMState(cpus: cpus), irqs: 0)
        var index: [Node: Int] = [start: 0]
        var nodes = [start]
        var parent: [(Int, PMAction)?] = [nil]
        var reverse: [[Int]] = [[]]
        var queue = [0]
        var head = 0
        func trace(_ k: Int) -> [PMAction] {
            var t: [PMAction] = []
            var c = k
            while let (p, a) = parent[c] { t.append(a); c = p }
            return t.reversed()
        }
        while head < queue.count {
            let k = queue[head]; head += 1
            let n = nodes[k]
            if let v = PMProtocol.violation(in: n.s) {
                report.violation = (v, trace(k))
                report.states = nodes.count
                return report
            }
            if PMExplorer.quiescent(n.s) { report.quiescentStates += 1; report.maxServed = max(report.maxServed, Int(n.s.served)) }
            for (a, m) in successors(n) {
                report.transitions += 1
                if let j = index[m] {
                    reverse[j].append(k)
                } else {
                    let j = nodes.count
                    index[m] = j
                    nodes.append(m)
                    parent.append((k, a))
                    reverse.append([k])
                    queue.append(j)
                }
            }
        }
        report.states = nodes.count
        // Liveness: every state can still reach a quiescent state where every request completed.
        var canFinish = [Bool](repeating: false, count: nodes.count)
        var work: [Int] = []
        for (k, n) in nodes.enumerated() where PMExplorer.quiescent(n.s) { canFinish[k] = true; work.append(k) }
        while let k = work.popLast() {
            for p in reverse[k] where !canFinish[p] { canFinish[p] = true; work.append(p) }
        }
        if let bad = canFinish.firstIndex(of: false) { report.stuck = (nodes[bad].s, trace(bad)) }
        return report
    }
}
