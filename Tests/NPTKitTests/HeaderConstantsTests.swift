import CNPTKit
import NPTCore
import Testing

/// The core (which does not see the C header) keeps its own values of the ABI's constants; the
/// exports hand them to C unchanged. Here the header's values, as Swift imports them (literal macros,
/// include/nptkit.h), are compared with the core's: a change of either side without the other fails.
@Suite struct HeaderConstantsTests {
    @Test func permissionsAndPageSizes() {
        #expect(EPTPermissions.read.rawValue == NPT_PERM_READ)
        #expect(EPTPermissions.write.rawValue == NPT_PERM_WRITE)
        #expect(EPTPermissions.supervisorExecute.rawValue == NPT_PERM_SX)
        #expect(EPTPermissions.userExecute.rawValue == NPT_PERM_UX)
        #expect(EPTPermissions.all.rawValue == NPT_PERM_ALL)
        #expect(PageSize.size4K.bytes == NPT_PAGE_4K)
        #expect(PageSize.size2M.bytes == NPT_PAGE_2M)
        #expect(PageSize.size1G.bytes == NPT_PAGE_1G)
    }

    @Test func capabilitiesAndVersion() {
        #expect(BackendCapabilities.mbecEmulation.rawValue == NPT_CAP_MBEC_EMULATION)
        #expect(BackendCapabilities.exitOnEscalation.rawValue == NPT_CAP_EXIT_ON_ESCALATE)
        #expect(BackendCapabilities.exitOnReturn.rawValue == NPT_CAP_EXIT_ON_RETURN)
        #expect(BackendCapabilities.linearModeInfo.rawValue == NPT_CAP_LINEAR_MODE_INFO)
        #expect(BackendCapabilities.run.rawValue == NPT_CAP_RUN)
        #expect(BackendCapabilities.privilegedMode.rawValue == NPT_CAP_PRIVILEGED_MODE)
        #expect(BackendCapabilities.persistentMemory.rawValue == NPT_CAP_PERSISTENT_MEMORY)
        #expect(NPTABI.version == NPT_ABI_VERSION)
        #expect(NPTABI.minor == NPT_ABI_VERSION_MINOR)
    }
}
