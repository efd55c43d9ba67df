import ArgumentParser
import NPTCore
import NPTScenarios

/// `nptkit-cli demo [--backend sim|kvm|...]`: the scenarios of the library (Sources/NPTScenarios) on
/// the backend asked for, the same code on every backend; this file only chooses by capabilities
/// and prints.
struct Demo: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run the scenarios: HVCI-like MBEC with two attacks, ret2dir through the kernel's entry in every mode, the privileged mode, NVDIMM durability.")
    @OptionGroup var options: BackendOptions
    @Option(help: "MBEC emulation mode: exact, lazy or violation-only (default: the strongest the backend's capabilities keep).")
    var mode: ModeArgument?
    @Option(help: "System calls the user process makes.")
    var syscalls: Int = 10

    func run() throws {
        let registry = try options.registry()
        let host = try options.host(registry)
        let name = host.backend.name
        guard let strongest = host.strongestMode else {
            fail("demo: backend '\(name)' cannot emulate MBEC: it lacks \(VMConfig.MBECMode.violationOnly.requiredCapabilities.subtracting(host.capabilities).shortNames.joined(separator: ", "))")
        }
        let mode = self.mode?.mode ?? strongest
        if let refusal = mode.refusal(backend: name, capabilities: host.capabilities) { fail("demo: \(refusal.message)") }
        guard host.capabilities.contains(.run) else { fail("demo: backend '\(name)' runs no guest code (no NPT_CAP_RUN)") }
        do { try host.withVM(VMConfig(ramSize: 1 << 20, mbecMode: mode)) { _ in } } catch {
            fail("demo: backend '\(name)' cannot create a VM here: \(error) (the backend says: \(host.backend.summary))")
        }
        print("NPTKit demo: emulated mode-based execute control on backend '\(name)' (guest ISA \(host.guestISA)), mode \(mode)"
              + (self.mode == nil ? " (the strongest its capabilities keep)" : "") + "\n")
        try hvciSection(host, mode: mode)
        try entryAttackSection(host)
        let cpus = 3
        if host.capabilities.contains(.privilegedMode) {
            try privilegedSection(host, mode: mode, cpus: cpus)
        } else {
            print("\n--- Privileged mode: not run (backend '\(name)' lacks NPT_CAP_PRIVILEGED_MODE) ---")
        }
        if host.capabilities.contains(.persistentMemory) {
            try nvdimmSection(host, mode: mode)
        } else {
            print("\n--- Virtualized NVDIMM WPQ flushing: not run (backend '\(name)' lacks NPT_CAP_PERSISTENT_MEMORY) ---")
        }
        try finishRecording()
    }

    // MARK: HVCI-like MBEC

    static func modeText(_ mode: VMConfig.MBECMode) -> String {
        switch mode {
        case .exact: "Mode exact: an exit on every entry to the kernel from user mode and on every return, each exposing the\nhierarchy of the new privilege level; a violation is judged by the linear address's U/S."
        case .lazy: "Mode lazy: every entry to the kernel from user mode is an escalation exit that exposes the supervisor\nhierarchy; the user one is exposed after a fetch violation (no exit on the return)."
        case .violationOnly: "Mode violation-only: no exit on a privilege change; the hierarchy changes only at a fetch violation."
        }
    }

    func hvciSection(_ host: ScenarioHost, mode: VMConfig.MBECMode) throws {
        let image = try HVCIScenario.image(for: host.guestISA)
        print("--- HVCI-like MBEC ---")
        print("Guest: an HVCI-like kernel and a user process making 'write' system calls, then two attacks: the user process")
        print("jumps into a supervisor-only driver page, the kernel into the user's JIT page through its kernel alias. After")
        print("each reported violation the VMM injects #VE; the guest kernel's handler reports it and resumes the user process.")
        print("Image: \(image.source); guest SMEP \(image.guestSMEP ? "on" : "off").")
        print("Policy (EPT bits R W Xs Xu); the rest of RAM \(image.defaultPermissions):")
        var p = Table(["guest-physical", "what", "policy"])
        for r in image.policy { p.add([hex(r.range.range.start.raw), r.label, r.range.permissions.description]) }
        print(p.render())
        for n in image.notes { print(wrapped(n)) }
        print(Demo.modeText(mode))
        let refused = VMConfig.MBECMode.allCases.filter { $0.refusal(backend: host.backend.name, capabilities: host.capabilities) != nil }
        if !refused.isEmpty {
            print("Refused on this backend: " + refused.map { m in
                "\(m) (no \(m.requiredCapabilities.subtracting(host.capabilities).shortNames.joined(separator: ", ")))"
            }.joined(separator: "; ") + ".")
        }

        let (o, s) = try HVCIScenario(syscalls: syscalls).run(host: host, mode: mode)
        guard o.halted else { throw NPTError(.state, "the HVCI scenario did not halt") }
        print("\nGuest output (system call 'write'): \(o.printed.map(String.init).joined(separator: " "))")
        print("\nViolations stopped (reported to the VMM with an EPT-violation qualification, then injected as #VE):")
        var v = Table(["#", "attempt", "cpl", "linear address", "guest-physical", "page", "access", "policy of page", "qualification"])
        for (i, x) in o.violations.enumerated() {
            let q = x.violation
            let who = x.cpl == 3 ? "user runs a supervisor-only page" : "kernel runs a user page"
            v.add(["\(i + 1)", who, "\(x.cpl)", q.contains(.linearValid) ? hex(x.gva.raw) : "-", hex(x.gpa.raw),
                   image.policy.label(of: x.gpa).map { String($0.split(separator: " (")[0]) } ?? "-",
                   q.contains(.fetch) ? "fetch" : q.contains(.write) ? "write" : "read",
                   policyText(q), hex(q.rawValue) + qualText(q)])
        }
        print(v.render())
        print("Attacks that ran guest code: \(o.attacksSucceeded)   Faults the guest kernel saw: \(o.faultsSeenByGuest.map { "vector \($0.vector) at \(hex($0.rip))" }.joined(separator: ", "))")

        print("\nExits by reason (the \(syscalls) system calls and the two attacks):")
        var e = Table(["reason", "count", "handled by"])
        let armed = mode == .violationOnly ? "not armed in mode \(mode)" : "core: expose supervisor hierarchy"
        e.add(["escalation (user -> supervisor)", "\(s.exitsEscalation)", armed])
        e.add(["return to user", "\(s.exitsReturnToUser)", mode == .exact ? "core: expose user hierarchy" : "not armed in mode \(mode)"])
        e.add(["EPT violation", "\(s.exitsEPTViolation)", "core: switch, or report (\(s.violationsReported) reported)"])
        e.add(["IO (guest output)", "\(o.printed.count + 2 * o.faultsSeenByGuest.count + o.attacksSucceeded)", "VMM"])
        e.add(["halt", o.halted ? "1" : "0", "VMM"])
        print(e.render())
        var line = "Hierarchy switches: \(s.hierarchySwitches)   Exits in all: \(s.exitsTotal)"
        if s.instructions > 0 { line += "   Guest instructions: \(s.instructions)   TLB hits/misses: \(s.tlbHits)/\(s.tlbMisses)" }
        print(line)

        // Exits per system-call round trip, isolated: the difference between two runs.
        let (_, longer) = try HVCIScenario(syscalls: syscalls + 100).run(host: host, mode: mode)
        let perCall = Double(mbecExits(longer) - mbecExits(s)) / 100
        print("Exits per system-call round trip: \(fmt(perCall)) (mode \(mode); the lower bound is 1, the escalation)")
    }

    // MARK: the entry attack

    /// Issue 9's attack in every mode, on the backend and on the same backend without its exits on a
    /// privilege change: what each mode promises, and what happened.
    func entryAttackSection(_ host: ScenarioHost) throws {
        let image = try HVCIScenario.image(for: host.guestISA)
        print("\n--- ret2dir through the kernel's entry, in every mode ---")
        print("An attacker with a kernel data write makes the kernel's entry for a system call land on a supervisor-mode alias")
        print("of the user JIT page (user-execute only); the user process then makes a system call. Hardware MBEC refuses the")
        print("kernel's first fetch there (a supervisor-mode address needs Xs). The entry here: \(image.entryAttackPath).")
        print("The attacker's writes:")
        for w in image.entryAttackWrites { print("  \(hex(w.gpa)): \(w.what)") }
        print("")
        var hosts = [host]
        let exits: BackendCapabilities = [.exitOnEscalation, .exitOnReturn]
        if !host.capabilities.intersection(exits).isEmpty {
            let weaker = WithheldCapabilities(host.backend, withholding: exits, name: "\(host.backend.name) without privilege-change exits")
            try host.registry.register(weaker)
            hosts.append(try host.on(weaker.name))
        }
        var t = Table(["backend", "mode", "outcome"])
        var kept = true
        for h in hosts {
            for mode in VMConfig.MBECMode.allCases {
                let (o, stats) = try EntryAttackScenario().run(host: h, mode: mode)
                kept = kept && EntryAttackScenario.keepsPromise(o, mode: mode)
                let text: String
                switch o {
                case .stopped(let x):
                    let q = x.violation
                    text = "stopped: MBEC violation at \(hex(x.gpa.raw)), cpl \(x.cpl), rip \(hex(x.rip)), \(policyText(q))\(qualText(q))"
                        + " (\(stats?.exitsEscalation ?? 0) escalation exit\(stats?.exitsEscalation == 1 ? "" : "s"))"
                case .ran(let cpl, let rip, let hierarchy):
                    text = "RAN the JIT bytes at cpl \(cpl), rip \(hex(rip)), under the \(hierarchy) hierarchy"
                        + (mode == .violationOnly ? " (the gap this mode names)" : "")
                case .refused:
                    text = "refused up front (NPT_ERR_GUARANTEE): no \(mode.requiredCapabilities.subtracting(h.capabilities).shortNames.joined(separator: ", "))"
                }
                t.add([h.backend.name, mode.description, text])
            }
        }
        print(t.render())
        print("Every mode kept its promise: \(kept ? "yes" : "NO") (exact and lazy stop it or are refused; violation-only names it as its gap)")
    }

    // MARK: privileged mode

    func privilegedSection(_ host: ScenarioHost, mode: VMConfig.MBECMode, cpus: Int) throws {
        let image = try PrivilegedScenario.image(for: host.guestISA, cpus: cpus)
        let scenario = PrivilegedScenario(cpus: cpus, requests: 2, bursts: 2, seed: 11, pauseNanos: 3_000_000)
        print("\n--- Privileged mode (SMM-like) with a secure global view ---")
        print("\(cpus) vCPUs on their own threads run a loop that bumps a heartbeat and probes the special region (\(hex(image.region.start)),")
        print("in no view outside the mode). Requests: \(scenario.requests) raised one after the other on random vCPUs, then \(scenario.bursts) bursts in")
        print("which every vCPU's request is raised at once, each from a thread of its own. The region's handler checks that")
        print("no heartbeat moves while it runs, counts its entry, and returns with RSM.")
        print("Image: \(image.source).")
        for n in image.notes { print(wrapped(n)) }
        print("")
        let o = try scenario.run(host: host, mode: mode)
        let t0 = o.records.map(\.raisedAt).min() ?? 0
        var t = Table(["#", "vCPU", "requested at", "entered at", "left at", "others stopped for", "handler count"])
        for (k, r) in o.records.enumerated() {
            t.add(["\(k + 1)", "\(r.cpu)", micros(r.raisedAt - t0), micros(r.enteredAt - t0), micros(r.leftAt - t0),
                   micros(r.othersStopped), k < o.handlerCounts.count ? "\(o.handlerCounts[k])" : ""])
        }
        print(t.render())
        print("Entries \(o.stats.entries) of \(o.stats.requests) requests, failures \(o.stats.failures); reads of the region from outside the mode: \(o.probesBlocked) blocked, \(o.leaks) succeeded")
        print("Heartbeats that moved while the region was visible: \(o.movedWhileVisible); heartbeats in RAM: \(o.heartbeats.map(String.init).joined(separator: " ")) (\(o.heartbeatOUTs) heartbeat OUTs)")
        print("Instructions run outside the mode while the region was visible: "
              + (o.instructionsCounted ? "\(o.outsideWhileVisible)" : "not counted by backend '\(host.backend.name)'")
              + "; the region in no hierarchy afterwards: \(o.regionAbsentAfter ? "yes" : "NO")")
        let counted = o.backendStatistics.filter { $0.value != 0 }
        if !counted.isEmpty {
            print(wrapped("Backend '\(host.backend.name)' counted (its own statistics of the VM, npt_vm_backend_stats): "
                          + counted.map(\.description).joined(separator: ", ")))
        }
        if o.wrongIndex > 0 { print("WARNING: the handler was entered with a wrong vCPU index \(o.wrongIndex) times") }
    }

    // MARK: NVDIMM

    func nvdimmSection(_ host: ScenarioHost, mode: VMConfig.MBECMode) throws {
        let records = 4
        let backend = host.backend.name
        let image = try NVDIMMScenario.image(for: host.guestISA)
        print("\n--- Virtualized NVDIMM WPQ flushing ---")
        print("A guest makes a record durable by the documented protocol: store, write-back (\(image.writeBack)), SFENCE, then a")
        print("write to the virtual flush hint address (vFHA) its NFIT names. Where the host region behind the")
        print("VM's NVDIMM range needs its write-pending queues flushed, the vFHA is write-protected: the write exits and the")
        print("core writes the physical flush hints of that region before resuming the guest. Where it does not, the vFHA is")
        print("plain memory: no exit. One vCPU writes \(records) durable records, then one it only stores and one it writes back")
        print("and fences but does not flush. Where the backend models one, the power then fails and the records are read back;")
        print("where it exposes its persistence model, a crash checker treats every persistence event as a possible power failure.")
        print("Image: \(image.source).")
        for n in image.notes { print(wrapped(n)) }
        print("")
        let rows: [(String, Bool, FlushOptions.Trap)] = [("needs flushing", true, .auto), ("needs no flushing", false, .auto),
                                                         ("needs flushing, traps off", true, .never)]
        var t = Table(["host region", "vFHA trapped", "flush exits", "guest flushes", "physical flushes", "untrapped vFHA writes",
                       "records announced", "read back", "durable survived", "stored-only", "fenced-only", "crash points", "losses found"])
        var outcomes: [NVDIMMScenario.Outcome] = []
        for (k, (label, needs, trap)) in rows.enumerated() {
            // Each kind of region from a registry whose backends are configured to offer it.
            let host = try options.host(options.registry(hostPMemNeedsFlush: needs), backend: backend)
            let scenario = NVDIMMScenario(needsWPQFlush: needs, options: FlushOptions(trap: trap), records: records, tail: true,
                                          logOffset: UInt64(k) * NVDIMMScenario.logStride)
            let o: NVDIMMScenario.Outcome
            do { o = try scenario.run(host: host, mode: mode) } catch let e as NPTError where e.code == .unsupported {
                t.add([label, "-", "-", "-", "-", "-", "-", "-", "-", "-", "-", "-", "not run: \(e.message)"])
                continue
            }
            outcomes.append(o)
            let s = o.stats
            let survived = { (n: Int, of: Int) in o.powerFailureModelled ? "\(n)/\(of)" : "-" }
            let tail = { (n: Int) in o.powerFailureModelled ? (n == 1 ? "survived" : "lost") : "-" }
            // Every announced record follows a vFHA write: untrapped ones the backend did not count show as "-".
            let untrapped = !o.trapped && s.untrappedWrites == 0 && o.durableAnnounced > 0 ? "-" : "\(s.untrappedWrites)"
            t.add(["\(label) (region \(o.region.id))", o.trapped ? "yes" : "no", "\(s.exits)", "\(s.guestFlushes)", "\(s.physicalFlushes)",
                   untrapped, "\(o.durableAnnounced)", "\(o.readBack)/\(o.records)" + (o.stale > 0 ? " (\(o.stale) there before)" : ""),
                   survived(o.survived, o.records), tail(o.storedOnlySurvived), tail(o.fencedOnlySurvived),
                   o.crash.map { "\($0.crashPoints)" } ?? "-",
                   o.crash.map { $0.losses.isEmpty ? "0" : "\($0.losses.count) (\(Set($0.losses.map { $0.spa & ~63 }).count) of \(o.records) records)" } ?? "-"])
        }
        print(t.render())
        let reports = outcomes.compactMap(\.crash)
        if reports.count == rows.count {
            print("Crash checker: \(reports[0].losses.count) losses with trapped flushes on the platform that needs WPQ flushing, \(reports[1].losses.count) on ADR, \(reports[2].losses.count) with traps disabled there")
            print("Each trapped guest flush costs one exit and drains every controller the host region is interleaved over; the")
            print("durable records survive where the protocol is honoured. Records never flushed are lost, except that ADR drains")
            print("the WPQ, so the fenced one survives it. With traps disabled the same guest's durable records sit in the WPQ at")
            print("the power failure and are lost, and the checker finds every one of them.")
        } else {
            print("Crash checker: not run (backend '\(backend)' exposes no persistence model to watch).")
        }
        if outcomes.contains(where: { !$0.powerFailureModelled }) {
            print("Power failure: not modelled by backend '\(backend)' (a power cut is unsupported there), so what reached the media")
            print("cannot be told apart from what the guest stored: the records are read back through the VM instead.")
        }
    }
}
