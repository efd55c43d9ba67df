/* CNPTKit: vends include/nptkit.h to Swift. */
