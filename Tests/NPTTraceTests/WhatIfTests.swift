import Testing
@testable import NPTTrace

func fixture(_ name: String) -> String { fixturesDirectory() + "/kvmtrace/" + name }

func policy(_ name: String) throws -> WhatIfPolicy {
    try WhatIfPolicy.parse(readTextFile(fixture(name))!, file: name)
}

let unitCosts = WhatIfCosts(exitNs: 1000, switchNs: 10_000, source: "test")

func report(_ trace: String, _ pol: WhatIfPolicy, _ mode: WhatIfMode) throws -> WhatIfReport {
    try WhatIfAnalysis.run(tracePath: fixture(trace), policy: pol, policyPath: "p", mode: mode, costs: unitCosts)
}

struct Expected: Equatable {
    var esc = 0, ret = 0, viol = 0, sw = 0, fetch = 0, data = 0, other = 0
    init(_ c: WhatIfCounts) {
        esc = c.escalationExits; ret = c.returnExits; viol = c.violationExits; sw = c.switches
        fetch = c.fetchViolations; data = c.dataViolations; other = c.ranUnderOtherHierarchy
    }
    init(esc: Int = 0, ret: Int = 0, viol: Int = 0, sw: Int = 0, fetch: Int = 0, data: Int = 0, other: Int = 0) {
        self.esc = esc; self.ret = ret; self.viol = viol; self.sw = sw; self.fetch = fetch; self.data = data; self.other = other
    }
}

@Suite struct WhatIfTests {
    /// handwritten-whatif-vmx.txt with whatif-vmx.policy, derived by hand:
    /// vCPU 0 exits at user 0x401000, kernel 0x..81001000, kernel 0x..81001010 (EPT read of the APIC page, no access: a
    /// data violation), user 0x401100, user 0x402000 (EPT fetch of a page executable in no mode);
    /// vCPU 1 at kernel 0x..81002000, user 0x500000 (Xs|Xu), kernel 0x..81000000.
    @Test func vmxStreamByHand() throws {
        let pol = try policy("whatif-vmx.policy")
        // exact: each change of mode is an exit and a switch; the 0x402000 fetch is a violation exit, reported.
        var r = try report("handwritten-whatif-vmx.txt", pol, .exact)
        #expect(r.rows.map(\.0) == ["vcpu 0 (pid 3001)", "vcpu 1 (pid 3002)"])
        #expect(Expected(r.rows[0].1) == Expected(esc: 1, ret: 1, viol: 1, sw: 2, fetch: 1, data: 1))
        #expect(Expected(r.rows[1].1) == Expected(esc: 1, ret: 1, sw: 2))
        #expect(r.total.exits == 8 && r.total.userToKernel == 2 && r.total.kernelToUser == 2)
        #expect(r.total.addedNs(unitCosts) == 5 * 1000 + 4 * 10_000)
        #expect(r.rows[0].1.durationNs == 400_000 && r.total.durationNs == 450_000)
        // lazy: no return exits; vCPU 0's return lands on a Xu-only page under the supervisor hierarchy (violation exit +
        // switch); vCPU 1's return lands on a Xs|Xu page, which runs, so its next escalation needs no switch.
        r = try report("handwritten-whatif-vmx.txt", pol, .lazy)
        #expect(Expected(r.rows[0].1) == Expected(esc: 1, viol: 2, sw: 2, fetch: 1, data: 1))
        #expect(Expected(r.rows[1].1) == Expected(esc: 1))
        // violation-only: vCPU 0 switches on the kernel fetch and on the user fetch; vCPU 1 never needs to.
        r = try report("handwritten-whatif-vmx.txt", pol, .violationOnly)
        #expect(Expected(r.rows[0].1) == Expected(viol: 3, sw: 2, fetch: 1, data: 1))
        #expect(Expected(r.rows[1].1) == Expected())
        #expect(r.render().contains("Assumptions (all figures are lower bounds):"))
    }

    /// The real captures of gen_guest (kernel 0xB000, stubs 0x8000, user 0x10000 and 0x16000): 13 exits to user space,
    /// modes k k [u u k] x3 u k: 4 user->kernel and 4 kernel->user changes, the same in all four captures.
    @Test func realCapturesByHand() throws {
        let pol = try policy("gen_guest.policy")
        for f in ["tracefs-trace.txt", "tracefs-trace_pipe.txt", "perf-script.txt", "trace-cmd-report.txt"] {
            let exact = try report(f, pol, .exact)
            #expect(exact.total.exits == 13 && exact.rows.count == 1, "\(f)")
            #expect(exact.total.userToKernel == 4 && exact.total.kernelToUser == 4, "\(f)")
            #expect(Expected(exact.total) == Expected(esc: 4, ret: 4, sw: 8), "\(f)")
            #expect(exact.input.contains("no kvm_exit event"), "\(f)")
            // lazy: each return becomes a violation exit on the Xu-only user page
            #expect(Expected(try report(f, pol, .lazy).total) == Expected(esc: 4, viol: 4, sw: 8), "\(f)")
            #expect(Expected(try report(f, pol, .violationOnly).total) == Expected(viol: 8, sw: 8), "\(f)")
        }
        // The stubs executable in both modes: violation-only no longer switches on the kernel side (the stub runs under
        // the user hierarchy: counted as other-hier), and the user side never violates after the first switch.
        var both = pol
        both.ranges = both.ranges.map { $0.start == 0x8000 ? WhatIfPolicy.Range(start: 0x8000, end: 0x9000, perms: permR | permXs | permXu) : $0 }
        let vo = try report("tracefs-trace.txt", both, .violationOnly)
        // The first exit (kernel, 0xB000) exposes the supervisor hierarchy; the first user exit (0x10000, Xu only)
        // violates and switches to the user hierarchy, where the stubs (Xs|Xu) and 0x10000 run from then on;
        // the kernel code page 0xB000 is never fetched at an exit again.
        #expect(Expected(vo.total) == Expected(viol: 1, sw: 1))
        // The page mapped late made non-executable: the failed fetch at 0x16000 is a reported violation; the write page
        // read-only: the three MMIO writes to 0x15000 are data violations.
        var strict = pol
        strict.ranges = strict.ranges.filter { $0.start != 0x16000 } + [.init(start: 0x16000, end: 0x17000, perms: permR),
                                                                          .init(start: 0x15000, end: 0x16000, perms: permR)]
        strict.ranges.sort { $0.start < $1.start }
        let s = try report("tracefs-trace.txt", strict, .exact)
        #expect(s.total.fetchViolations == 1 && s.total.dataViolations == 3)
    }

    @Test func noMBECNeededAddsNothing() throws {
        var pol = try policy("gen_guest.policy")
        pol.ranges = pol.ranges.map { .init(start: $0.start, end: $0.end, perms: permR | permXs | permXu) }
        let r = try report("tracefs-trace.txt", pol, .exact)
        #expect(!r.needsMBEC && r.total.addedExits == 0 && r.total.switches == 0 && r.total.exits == 13)
    }

    @Test func nptkitTraceInput() throws {
        let path = "/tmp/npttrace-whatif-\(getpidValue()).trace"
        defer { unlinkFile(path) }
        let w = try TraceWriter(path: path)
        // user IO, kernel IO (escalation recorded by MBEC: skipped), kernel HALT, user IO
        try w.append(.exit(vcpu: 0, TraceExit(reason: .io, cpl: 3, rip: 0x10000)), at: 1)
        try w.append(.exit(vcpu: 0, TraceExit(reason: .escalation, cpl: 3, rip: 0x10002)), at: 2)
        try w.append(.exit(vcpu: 0, TraceExit(reason: .halt, cpl: 0, rip: 0xB000)), at: 3)
        try w.append(.exit(vcpu: 0, TraceExit(reason: .io, cpl: 3, rip: 0x10004)), at: 4)
        try w.finish()
        let r = try WhatIfAnalysis.run(tracePath: path, policy: try policy("gen_guest.policy"), policyPath: "p", mode: .exact, costs: unitCosts)
        #expect(r.total.exits == 3 && Expected(r.total) == Expected(esc: 1, ret: 1, sw: 2))
        #expect(r.input.hasPrefix("NPTKit trace \(TraceFormat.major).\(TraceFormat.minor)"))
    }

    @Test func policyAndCostsFilesRefuseBadLinesWithTheirNumber() {
        let bad: [(String, Int, String)] = [
            ("0x1000 0x1000 R|Q", 1, "PERMS"),
            ("# c\n0x1000 zz R", 2, "SIZE \"zz\""),
            ("0x1000 0x2000 R\n0x2000 0x1000 W", 2, "overlaps"),
            ("\n\nmap 1 2", 3, "map GVA SIZE GPA"),
            ("kernel 5 5", 1, "below END"),
            ("default", 1, "default PERMS"),
            ("0x1000 0 R", 1, "empty"),
        ]
        for (text, line, why) in bad {
            do { _ = try WhatIfPolicy.parse(text, file: "f"); Issue.record("accepted: \(text)") } catch {
                #expect(error.line == line && error.description.contains(why), "\(error)")
            }
        }
        do { _ = try WhatIfCosts.parse("exit_ns 5\nswitch_ms 3", file: "c"); Issue.record("accepted") } catch {
            #expect(error.line == 2 && error.message.contains("switch_ms"))
        }
        let c = try? WhatIfCosts.parse("exit_ns 5 # x\nswitch_ns 7", file: "c")
        #expect(c?.exitNs == 5 && c?.switchNs == 7)
    }

    @Test func policyLookup() throws {
        let p = try policy("whatif-vmx.policy")
        #expect(p.perms(0x1000000) == permR | permXs && p.perms(0x1ffffff) == permR | permXs && p.perms(0x2000000) == permR | permW)
        #expect(p.perms(0x402fff) == permR && p.perms(0xfee00000) == 0)
        #expect(p.gpa(ofLinear: 0xffff_ffff_8100_1234) == 0x1001234 && p.gpa(ofLinear: 0x401000) == 0x401000)
        #expect(p.isKernel(rip: 0xffff_ffff_8100_0000) && !p.isKernel(rip: 0x7fff_ffff_ffff))
        #expect(parsePerms("R|W|Xs|Xu") == permR | permW | permXs | permXu && parsePerms("-") == 0 && parsePerms("R|Z") == nil)
    }
}
