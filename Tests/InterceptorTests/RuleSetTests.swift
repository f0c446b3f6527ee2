import Testing

@testable import Interceptor

/// The rule builder alone: exact text, validation, and the transactions built from a saved state.
@Suite struct RuleSetTests {
    @Test func defaultsCaptureAllButSSHTrellisLoopbackDNSAndTheAgent() throws {
        let rules = try RuleSet(CaptureConfig(agentUID: 990))
        #expect(rules.families == [.ipv4, .ipv6])
        #expect(
            rules.restoreText(.ipv4) == """
                *nat
                :TRELLIS_INBOUND - [0:0]
                :TRELLIS_IN_REDIRECT - [0:0]
                :TRELLIS_OUTPUT - [0:0]
                :TRELLIS_REDIRECT - [0:0]
                -A TRELLIS_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
                -A TRELLIS_REDIRECT -p tcp -j REDIRECT --to-ports 15001
                -A TRELLIS_INBOUND -p tcp -m tcp --dport 15000 -j RETURN
                -A TRELLIS_INBOUND -p tcp -m tcp --dport 15001 -j RETURN
                -A TRELLIS_INBOUND -p tcp -m tcp --dport 15006 -j RETURN
                -A TRELLIS_INBOUND -p tcp -m tcp --dport 15010 -j RETURN
                -A TRELLIS_INBOUND -p tcp -m tcp --dport 15014 -j RETURN
                -A TRELLIS_INBOUND -p tcp -m tcp --dport 22 -j RETURN
                -A TRELLIS_INBOUND -p tcp -j TRELLIS_IN_REDIRECT
                -A TRELLIS_OUTPUT -m mark --mark 0x1000 -j RETURN
                -A TRELLIS_OUTPUT -m owner --uid-owner 990 -j RETURN
                -A TRELLIS_OUTPUT -o lo -j RETURN
                -A TRELLIS_OUTPUT -d 127.0.0.0/8 -j RETURN
                -A TRELLIS_OUTPUT -p tcp -m tcp --dport 53 -j RETURN
                -A TRELLIS_OUTPUT -p tcp -m tcp --dport 15000 -j RETURN
                -A TRELLIS_OUTPUT -p tcp -m tcp --dport 15001 -j RETURN
                -A TRELLIS_OUTPUT -p tcp -m tcp --dport 15006 -j RETURN
                -A TRELLIS_OUTPUT -p tcp -m tcp --dport 15010 -j RETURN
                -A TRELLIS_OUTPUT -p tcp -m tcp --dport 15014 -j RETURN
                -A TRELLIS_OUTPUT -p tcp -j TRELLIS_REDIRECT
                -A PREROUTING -p tcp -j TRELLIS_INBOUND
                -A OUTPUT -p tcp -j TRELLIS_OUTPUT
                COMMIT

                """
        )
        #expect(rules.restoreText(.ipv6).contains("-A TRELLIS_OUTPUT -d ::1/128 -j RETURN"))
    }

    @Test func theGateQueuesTheSameSelectionAndRedirectsOnlyMarkedSYNs() throws {
        let rules = try RuleSet(
            CaptureConfig(
                inbound: .only([8080]),
                outboundIncludeCIDRs: [try CIDR("10.0.0.0/8")],
                gate: .init(queue: 7, mark: 0x1)
            )
        )
        let text = rules.restoreText(.ipv4)
        #expect(text.hasPrefix("*mangle\n:TRELLIS_GATE_IN - [0:0]\n:TRELLIS_GATE_OUT - [0:0]\n"))
        #expect(
            text.contains(
                "-A TRELLIS_GATE_IN -p tcp -m tcp --dport 8080 --tcp-flags FIN,SYN,RST,ACK SYN -j NFQUEUE --queue-num 7 --queue-bypass"
            )
        )
        #expect(
            text.contains(
                "-A TRELLIS_GATE_OUT -d 10.0.0.0/8 -p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK SYN -j NFQUEUE --queue-num 7 --queue-bypass"
            )
        )
        #expect(text.contains("-A TRELLIS_REDIRECT -p tcp -m mark --mark 0x1/0x1 -j REDIRECT --to-ports 15001"))
        #expect(text.contains("-A TRELLIS_INBOUND -p tcp -m tcp --dport 8080 -j TRELLIS_IN_REDIRECT"))
        // An IPv4-only include list captures nothing outbound over IPv6.
        #expect(!rules.restoreText(.ipv6).contains("-A TRELLIS_OUTPUT -p tcp -j TRELLIS_REDIRECT"))
    }

    @Test func unsafeOrMeaninglessConfigurationsAreRefusedBeforeAnyRule() throws {
        func problems(_ config: CaptureConfig) -> [String] {
            do {
                _ = try RuleSet(config)
                return []
            } catch {
                return error.errors.map(\.description)
            }
        }
        #expect(
            problems(CaptureConfig(inbound: .only([8080, 15006]))).contains {
                $0.contains("inbound_ports[1]: port 15006 is Trellis's own")
            }
        )
        #expect(
            problems(CaptureConfig(inbound: .only([0]))).contains {
                $0.contains("inbound_ports[0]: expected a port in 1...65535, got 0")
            }
        )
        #expect(
            problems(CaptureConfig(excludedPorts: [70000])).contains {
                $0.contains("exclude_ports[0]: expected a port in 1...65535, got 70000")
            }
        )
        #expect(
            problems(CaptureConfig(outboundExcludeCIDRs: [try CIDR("10.0.0.0/8"), try CIDR("10.1.0.0/16")]))
                .contains { $0.contains("outbound_exclude_cidrs[1]: 10.1.0.0/16 overlaps 10.0.0.0/8") }
        )
        #expect(problems(CaptureConfig(agentMark: 0x1, gate: .init(mark: 0x1))).contains { $0.contains("gate.mark") })
        #expect(
            problems(CaptureConfig(ipv4: false, ipv6: false)).contains { $0.contains("at least one of ipv4 and ipv6") }
        )
    }

    @Test func cidrsParseNormaliseAndOverlap() throws {
        #expect("\(try CIDR("10.1.2.3/8"))" == "10.0.0.0/8")
        #expect("\(try CIDR("fd00:0:0:1::5/64"))" == "fd00:0:0:1::/64")
        #expect("\(try CIDR("192.168.1.1"))" == "192.168.1.1/32")
        #expect(try CIDR("10.0.0.0/8").overlaps(CIDR("10.200.0.0/16")))
        #expect(try !CIDR("10.0.0.0/16").overlaps(CIDR("10.1.0.0/16")))
        #expect(try !CIDR("10.0.0.0/8").overlaps(CIDR("fd00::/8")))
        #expect(throws: CaptureConfigError.self) { try CIDR("10.0.0.300/8") }
        #expect(throws: CaptureConfigError.self) { try CIDR("10.0.0.0/33") }
        #expect(throws: CaptureConfigError.self) { try CIDR("fd00:::1/64") }
    }

    @Test func removeTouchesOnlyTrellisLinesOfTheSavedState() {
        let save = """
            *nat
            :PREROUTING ACCEPT [0:0]
            :OUTPUT ACCEPT [0:0]
            :DOCKER - [0:0]
            :TRELLIS_OUTPUT - [0:0]
            -A OUTPUT -p tcp -j TRELLIS_OUTPUT
            -A OUTPUT -d 10.9.0.0/16 -j DOCKER
            -A TRELLIS_OUTPUT -o lo -j RETURN
            COMMIT
            """
        let state = IPTablesState(save: save)
        let text = Capture(backend: .nft).removeTransaction(current: state)
        #expect(text == "*nat\n-D OUTPUT -p tcp -j TRELLIS_OUTPUT\n-F TRELLIS_OUTPUT\n-X TRELLIS_OUTPUT\nCOMMIT\n")
    }
}
