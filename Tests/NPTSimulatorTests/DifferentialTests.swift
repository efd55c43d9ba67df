import NPTCore
import NPTDifferential
import Testing

/// The differential test (Tests/Support/Differential): the emulation against `ReferenceMBEC`, the
/// SDM model that shares no code with it. 2 million steps over every configuration, spread over
/// both cores; `swift run -c release nptkit-differential --steps N` runs more. Every divergence must
/// be a documented class of its configuration (README, "Where the emulation differs from hardware
/// MBEC"), and the generator must actually have exercised what it claims to.
@Suite struct DifferentialTests {
    @Test("2 million differential steps: every divergence documented, exact mode with SMEP exact")
    func twoMillionSteps() throws {
        let reports = try DifferentialSuite.runParts(totalSteps: 2_040_000, seed: 20261129)
        var total = DifferentialReport()
        for (p, r) in zip(DifferentialSuite.parts, reports) {
            print("differential \(p.name): \(r.summary)")
            total.add(r)
            #expect(r.unclassified.isEmpty, "\(p.name): \(r.unclassified.prefix(3).joined(separator: "\n"))")
            for c in r.divergences.keys { #expect(p.config.allowed.contains(c), "\(p.name): \(c)") }
            #expect(r.steps > 0)
            if p.config.mode == .exact && p.config.smep { #expect(r.divergences.isEmpty, "\(p.name) must be exact") }
        }
        print("differential total: \(total.summary)")
        #expect(total.steps >= 2_000_000, "only \(total.steps) steps")
        // Teeth: the documented gaps do show where they should (else the generator lost its reach).
        let byName = Dictionary(uniqueKeysWithValues: zip(DifferentialSuite.parts.map(\.name), reports))
        #expect((byName["lazy smep=true"]?.divergences[.staleSupervisorAtCPL3] ?? 0) > 0)
        #expect((byName["violation-only smep=true without escalation+return exits"]?.divergences[.staleUserAtCPL0] ?? 0) > 0)
        #expect((byName["exact smep=false"]?.divergences[.smepOffUserAddress] ?? 0) > 0)
        // Reach: every feature of the generator came up.
        #expect(total.policyChanges > 1000)
        #expect(total.injections > 100)
        #expect(total.privilegedEntries > 100)
        #expect(total.structureViolations > 100)
        #expect(total.accessedDirtyViolations > 100)
        #expect(total.pageTableWrites > 100)
        #expect(total.pagingOffSteps > 10_000)
        #expect(total.wpOffSteps > 10_000)
        #expect(total.nxeOffSteps > 10_000)
        #expect(total.smapSteps > 10_000)
        #expect(total.reservedBitFaults > 10)
        #expect(total.largePageSteps > 100)
        #expect(total.nvdimmAccesses > 10)
        #expect(total.supervisorOnlyAtUserAddressAfterReturn > 10)
        #expect(total.vcpusCreated > 500)
    }
}
