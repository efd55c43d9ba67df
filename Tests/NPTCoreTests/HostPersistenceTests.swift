import Foundation
import NPTCore
import Testing

private typealias Target = HostPersistence.FlushTarget

@Suite struct HostPersistenceTests {
    @Test func fromNFITFixtureWithoutADR() throws {
        let hp = HostPersistence.fromNFIT(try NFIT.parse(try fixtureBytes("nfit/nfit.aml")))
        #expect(hp.source == "nfit")
        #expect(hp.needsWPQFlush)
        #expect(hp.regions == [
            .init(id: 1, base: 0x2_4000_0000, size: 0x1_0000_0000, controllers: [0x0000, 0x0100],
                  flushTargets: [Target(controller: 0x0000, address: 0xC000_0000),
                                 Target(controller: 0x0100, address: 0xC001_0000)],
                  needsWPQFlush: true),
            .init(id: 2, base: 0x3_4000_0000, size: 0x8000_0000, controllers: [0x1000],
                  flushTargets: [Target(controller: 0x1000, address: 0x1_C000_0000)], needsWPQFlush: true),
        ])
    }

    @Test func fromNFITFixtureWithADR() throws {
        let hp = HostPersistence.fromNFIT(try NFIT.parse(try fixtureBytes("nfit/nfit-adr.aml")))
        #expect(!hp.needsWPQFlush)
        #expect(hp.regions.map(\.id) == [1, 2])
        #expect(hp.regions.map(\.needsWPQFlush) == [false, false])
        #expect(hp.regions.map(\.controllers) == [[0x0000, 0x0100], [0x1000]])
        // The flush hints are still reported.
        #expect(hp.regions.map(\.flushTargets) == [
            [Target(controller: 0, address: 0xC000_0000), Target(controller: 0x100, address: 0xC001_0000)],
            [Target(controller: 0x1000, address: 0x1_C000_0000)],
        ])
        #expect(hp.regions.allSatisfy { $0.deepFlushPath == nil })
        #expect(hp.regions.map(\.domain) == [.memoryController, .memoryController])
    }

    @Test func fromNFITRules() {
        let pm = NFIT.persistentMemoryGUID
        var nfit = NFIT(
            spaRanges: [.init(index: 7, typeGUID: pm, base: 0x1000, length: 0x1000),
                        .init(index: 5, typeGUID: pm, base: 0x8000, length: 0x2000),
                        .init(index: 6, typeGUID: NFIT.controlRegionGUID, base: 0x9000, length: 0x100)],
            memoryMaps: [.init(deviceHandle: 0x0021, spaRangeIndex: 7), .init(deviceHandle: 0x0001, spaRangeIndex: 7),
                         .init(deviceHandle: 0x0031, spaRangeIndex: 7), .init(deviceHandle: 0x2_0201, spaRangeIndex: 7),
                         .init(deviceHandle: 0x0001, spaRangeIndex: 6), .init(deviceHandle: 0x0301, spaRangeIndex: 5)],
            // 0x0001 (lowest handle of controller 0) has no addresses: 0x0021 gives the target.
            flushHints: [.init(deviceHandle: 0x0031, addresses: [0xB000]), .init(deviceHandle: 0x0021, addresses: [0xA000, 0xA040]),
                         .init(deviceHandle: 0x0001, addresses: []), .init(deviceHandle: 0x0301, addresses: [])])
        var hp = HostPersistence.fromNFIT(nfit)
        #expect(hp.regions == [
            .init(id: 5, base: 0x8000, size: 0x2000, controllers: [0x0300], flushTargets: [], needsWPQFlush: false),
            .init(id: 7, base: 0x1000, size: 0x1000, controllers: [0x0000, 0x2_0200],
                  flushTargets: [Target(controller: 0, address: 0xA000)], needsWPQFlush: true),
        ])
        #expect(hp.needsWPQFlush)
        #expect(hp.regions.map(\.domain) == [.media, .media])
        // Bit 0 (CPU cache flush on power loss) valid and set: WPQ in the persistence domain.
        nfit.platformCapabilities = .init(highestValid: 0, capabilities: 1)
        hp = HostPersistence.fromNFIT(nfit)
        #expect(!hp.needsWPQFlush)
        #expect(hp.regions[1].flushTargets == [Target(controller: 0, address: 0xA000)])
        #expect(hp.regions.map(\.domain) == [.cpuCache, .cpuCache])
        // Bit 2 alone (mirroring) does not.
        nfit.platformCapabilities = .init(highestValid: 2, capabilities: 4)
        #expect(HostPersistence.fromNFIT(nfit).needsWPQFlush)
        nfit.platformCapabilities = .init(highestValid: 1, capabilities: 2)
        #expect(!HostPersistence.fromNFIT(nfit).needsWPQFlush)
        #expect(HostPersistence.fromNFIT(nfit).regions[0].domain == .memoryController)
        // Both bits: cpu_cache, as Linux reads it (bit 0 first).
        nfit.platformCapabilities = .init(highestValid: 1, capabilities: 3)
        #expect(HostPersistence.fromNFIT(nfit).regions[0].domain == .cpuCache)
        // Bit 1 set but beyond the highest valid capability (0): not counted.
        nfit.platformCapabilities = .init(highestValid: 0, capabilities: 2)
        #expect(HostPersistence.fromNFIT(nfit).regions[0].domain == .media)
        #expect(HostPersistence.fromNFIT(NFIT()) == HostPersistence(regions: [], source: "nfit"))
    }
}
