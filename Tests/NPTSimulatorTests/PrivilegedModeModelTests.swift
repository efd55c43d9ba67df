import NPTCore
import Testing
import NPTModelCheck

/// Exhaustive interleavings of the privileged-mode protocol (the transition code the runtime uses).
@Suite struct PrivilegedModeModelTests {
    struct Case: Sendable, CustomTestStringConvertible {
        var cpus: Int, requests: Int, timeouts: Bool
        var testDescription: String { "\(cpus) CPUs, \(requests) requests, timeouts \(timeouts)" }
    }
    static let cases = [Case(cpus: 2, requests: 3, timeouts: false), Case(cpus: 2, requests: 3, timeouts: true),
                        Case(cpus: 3, requests: 3, timeouts: false), Case(cpus: 3, requests: 2, timeouts: true)]

    @Test("every interleaving keeps the invariant, nothing is stuck, every request completes", arguments: cases)
    func correctProtocol(c: Case) {
        let r = PMExplorer(cpus: c.cpus, maxRequests: c.requests, allowTimeouts: c.timeouts).run()
        print("PM model \(c.testDescription): \(r.states) states, \(r.transitions) transitions, max served \(r.maxServed)")
        #expect(r.violation == nil, "\(r.violation?.message ?? ""): \(r.violation?.trace ?? [])")
        #expect(r.stuck == nil, "stuck: \(r.stuck.map { "\($0.state) after \($0.trace)" } ?? "")")
        #expect(r.maxServed == c.requests, "some schedule should serve every request")
        #expect(r.states > 100)
    }

    @Test("each broken variant is caught", arguments: [PMVariant.mapBeforeStopped, .resumeBeforeUnmap, .noFlushOnLeave])
    func brokenVariants(v: PMVariant) {
        let r = PMExplorer(cpus: 2, maxRequests: 2, allowTimeouts: false, variant: v).run()
        #expect(r.violation != nil, "variant \(v) was not caught")
        if let x = r.violation { print("PM model variant \(v): caught: \(x.message) after \(x.trace)") }
    }
}
