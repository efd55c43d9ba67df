/*
 * NPTKit test fixture: the same NFIT on a platform with ADR: platform
 * capabilities bit 1 (memory controller flush to NVDIMM on power loss) is valid and set, so the
 * WPQ is in the persistence domain and no WPQ flushing is needed.
 * Source for ACPICA's iasl (acpica-tools); `iasl nfit-adr.asl` compiles it to the .aml
 * binary next to it (iasl fills in the table length and checksum).
 *
 * Region 0 (SPA range 1, 4 GiB at 0x240000000): 4-way interleave over DIMMs 0x0001 and 0x0011
 *   (socket 0, memory controller 0, channels 0 and 1) and 0x0101 and 0x0111 (socket 0, controller 1).
 * Region 1 (SPA range 2, 2 GiB at 0x340000000): DIMM 0x1001 (socket 1, controller 0), not interleaved.
 * SPA range 3 is an NVDIMM control region (not persistent memory).
 * DIMMs on the same memory controller list the same flush hint addresses.
 */
[0004]                          Signature : "NFIT"    [NVDIMM Firmware Interface Table]
[0004]                       Table Length : 00000000
[0001]                           Revision : 01
[0001]                           Checksum : 00
[0006]                             Oem ID : "NPTKIT"
[0008]                       Oem Table ID : "NPTKADR "
[0004]                       Oem Revision : 00000002
[0004]                    Asl Compiler ID : "INTL"
[0004]              Asl Compiler Revision : 20200925

[0004]                           Reserved : 00000000

[0002]                      Subtable Type : 0000 [System Physical Address Range]
[0002]                             Length : 0038

[0002]                        Range Index : 0001
[0002]              Flags (decoded below) : 0002
                Add/Online Operation Only : 0
                   Proximity Domain Valid : 1
[0004]                           Reserved : 00000000
[0004]                   Proximity Domain : 00000000
[0016]                   Region Type GUID : 66F0D379-B4F3-4074-AC43-0D3318B78CDB
[0008]                 Address Range Base : 0000000240000000
[0008]               Address Range Length : 0000000100000000
[0008]               Memory Map Attribute : 0000000000008008

[0002]                      Subtable Type : 0000 [System Physical Address Range]
[0002]                             Length : 0038

[0002]                        Range Index : 0002
[0002]              Flags (decoded below) : 0002
                Add/Online Operation Only : 0
                   Proximity Domain Valid : 1
[0004]                           Reserved : 00000000
[0004]                   Proximity Domain : 00000001
[0016]                   Region Type GUID : 66F0D379-B4F3-4074-AC43-0D3318B78CDB
[0008]                 Address Range Base : 0000000340000000
[0008]               Address Range Length : 0000000080000000
[0008]               Memory Map Attribute : 0000000000008008

[0002]                      Subtable Type : 0000 [System Physical Address Range]
[0002]                             Length : 0038

[0002]                        Range Index : 0003
[0002]              Flags (decoded below) : 0000
                Add/Online Operation Only : 0
                   Proximity Domain Valid : 0
[0004]                           Reserved : 00000000
[0004]                   Proximity Domain : 00000000
[0016]                   Region Type GUID : 92F701F6-13B4-405D-910B-299367E8234C
[0008]                 Address Range Base : 00000000FE000000
[0008]               Address Range Length : 0000000000010000
[0008]               Memory Map Attribute : 0000000000000001

[0002]                      Subtable Type : 0001 [Memory Range Map]
[0002]                             Length : 0030

[0004]                      Device Handle : 00000001
[0002]                        Physical Id : 0001
[0002]                          Region Id : 0000
[0002]                        Range Index : 0001
[0002]               Control Region Index : 0000
[0008]                        Region Size : 0000000040000000
[0008]                      Region Offset : 0000000000000000
[0008]                Address Region Base : 0000000000000000
[0002]                   Interleave Index : 0001
[0002]                    Interleave Ways : 0004
[0002]                              Flags : 0000
                    Save to device failed : 0
               Restore from device failed : 0
                    Platform flush failed : 0
                         Device not armed : 0
                   Health events observed : 0
                    Health events enabled : 0
                           Mapping failed : 0
[0002]                           Reserved : 0000

[0002]                      Subtable Type : 0001 [Memory Range Map]
[0002]                             Length : 0030

[0004]                      Device Handle : 00000011
[0002]                        Physical Id : 0002
[0002]                          Region Id : 0000
[0002]                        Range Index : 0001
[0002]               Control Region Index : 0000
[0008]                        Region Size : 0000000040000000
[0008]                      Region Offset : 0000000000001000
[0008]                Address Region Base : 0000000000000000
[0002]                   Interleave Index : 0001
[0002]                    Interleave Ways : 0004
[0002]                              Flags : 0000
                    Save to device failed : 0
               Restore from device failed : 0
                    Platform flush failed : 0
                         Device not armed : 0
                   Health events observed : 0
                    Health events enabled : 0
                           Mapping failed : 0
[0002]                           Reserved : 0000

[0002]                      Subtable Type : 0001 [Memory Range Map]
[0002]                             Length : 0030

[0004]                      Device Handle : 00000101
[0002]                        Physical Id : 0003
[0002]                          Region Id : 0000
[0002]                        Range Index : 0001
[0002]               Control Region Index : 0000
[0008]                        Region Size : 0000000040000000
[0008]                      Region Offset : 0000000000002000
[0008]                Address Region Base : 0000000000000000
[0002]                   Interleave Index : 0001
[0002]                    Interleave Ways : 0004
[0002]                              Flags : 0000
                    Save to device failed : 0
               Restore from device failed : 0
                    Platform flush failed : 0
                         Device not armed : 0
                   Health events observed : 0
                    Health events enabled : 0
                           Mapping failed : 0
[0002]                           Reserved : 0000

[0002]                      Subtable Type : 0001 [Memory Range Map]
[0002]                             Length : 0030

[0004]                      Device Handle : 00000111
[0002]                        Physical Id : 0004
[0002]                          Region Id : 0000
[0002]                        Range Index : 0001
[0002]               Control Region Index : 0000
[0008]                        Region Size : 0000000040000000
[0008]                      Region Offset : 0000000000003000
[0008]                Address Region Base : 0000000000000000
[0002]                   Interleave Index : 0001
[0002]                    Interleave Ways : 0004
[0002]                              Flags : 0020
                    Save to device failed : 0
               Restore from device failed : 0
                    Platform flush failed : 0
                         Device not armed : 0
                   Health events observed : 0
                    Health events enabled : 1
                           Mapping failed : 0
[0002]                           Reserved : 0000

[0002]                      Subtable Type : 0001 [Memory Range Map]
[0002]                             Length : 0030

[0004]                      Device Handle : 00001001
[0002]                        Physical Id : 0005
[0002]                          Region Id : 0000
[0002]                        Range Index : 0002
[0002]               Control Region Index : 0000
[0008]                        Region Size : 0000000080000000
[0008]                      Region Offset : 0000000000000000
[0008]                Address Region Base : 0000000000000000
[0002]                   Interleave Index : 0000
[0002]                    Interleave Ways : 0001
[0002]                              Flags : 0000
                    Save to device failed : 0
               Restore from device failed : 0
                    Platform flush failed : 0
                         Device not armed : 0
                   Health events observed : 0
                    Health events enabled : 0
                           Mapping failed : 0
[0002]                           Reserved : 0000

[0002]                      Subtable Type : 0002 [Interleave Info]
[0002]                             Length : 0014

[0002]                   Interleave Index : 0001
[0002]                           Reserved : 0000
[0004]                         Line Count : 00000001
[0004]                          Line Size : 00001000
[0004]                        Line Offset : 00000000

[0002]                      Subtable Type : 0006 [Flush Hint Address]
[0002]                             Length : 0020

[0004]                      Device Handle : 00000001
[0002]                         Hint Count : 0002
[0006]                           Reserved : 000000000000
[0008]                       Hint Address : 00000000C0000000
[0008]                       Hint Address : 00000000C0000040

[0002]                      Subtable Type : 0006 [Flush Hint Address]
[0002]                             Length : 0020

[0004]                      Device Handle : 00000011
[0002]                         Hint Count : 0002
[0006]                           Reserved : 000000000000
[0008]                       Hint Address : 00000000C0000000
[0008]                       Hint Address : 00000000C0000040

[0002]                      Subtable Type : 0006 [Flush Hint Address]
[0002]                             Length : 0020

[0004]                      Device Handle : 00000101
[0002]                         Hint Count : 0002
[0006]                           Reserved : 000000000000
[0008]                       Hint Address : 00000000C0010000
[0008]                       Hint Address : 00000000C0010040

[0002]                      Subtable Type : 0006 [Flush Hint Address]
[0002]                             Length : 0020

[0004]                      Device Handle : 00000111
[0002]                         Hint Count : 0002
[0006]                           Reserved : 000000000000
[0008]                       Hint Address : 00000000C0010000
[0008]                       Hint Address : 00000000C0010040

[0002]                      Subtable Type : 0006 [Flush Hint Address]
[0002]                             Length : 0018

[0004]                      Device Handle : 00001001
[0002]                         Hint Count : 0001
[0006]                           Reserved : 000000000000
[0008]                       Hint Address : 00000001C0000000

[0002]                      Subtable Type : 0007 [Platform Capabilities]
[0002]                             Length : 0010

[0001]                 Highest Capability : 01
[0003]                           Reserved : 000000
[0004]       Capabilities (decoded below) : 00000002
                    Cache Flush to NVDIMM : 0
                   Memory Flush to NVDIMM : 1
                         Memory Mirroring : 0
[0004]                           Reserved : 00000000
