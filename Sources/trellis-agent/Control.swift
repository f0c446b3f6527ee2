import Agent
import ArgumentParser
import Foundation
import Proxy
import TrellisConfig
import TrellisHTTP
import TrellisValues

/// Options shared by the commands that talk to a running agent over its control socket.
struct ControlOptions: ParsableArguments {
    @Option(help: "The running agent's control socket.")
    var socket = ControlServer.defaultPath

    @Flag(help: "Print the agent's JSON answer instead of text.")
    var json = false

    /// Sends one command; a missing agent or an error answer is a clear message and exit 1.
    func send(_ method: String, _ path: String, timeout: Duration) async throws -> String {
        let response: HTTPClient.Response
        do {
            response = try await HTTPClient().request(method, unixSocket: socket, path: path, timeout: timeout)
        } catch {
            let reason = FileManager.default.fileExists(atPath: socket) ? "\(error)" : "no such socket"
            throw AgentCommandError(
                "cannot reach the agent at \(socket) (\(reason)); is trellis-agent running, and are you root?"
            )
        }
        guard response.status == 200 else {
            let message =
                (try? JSONDecoder().decode([String: String].self, from: Data(response.body)))?["error"] ?? response.text
            throw AgentCommandError("the agent refused: \(message) (HTTP \(response.status))")
        }
        return response.text
    }
}

struct AgentCommandError: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}

/// `trellis-agent drain`: stop taking new work and wait for the work in hand.
struct Drain: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Drain the running agent: pilot stops sending it new requests, idle connections close, "
            + "in-flight requests finish (up to the deadline); prints what it did.",
        discussion: "Exit status 0 when everything in flight finished before the deadline, 2 when some was left."
    )

    @Option(help: "How long to wait for in-flight work (e.g. 30s, 2m); default: the agent's drain_deadline.")
    var deadline: String?

    @OptionGroup var control: ControlOptions

    func validate() throws {
        if let deadline {
            guard let parsed = DurationText.parse(deadline), parsed <= .seconds(24 * 3600) else {
                throw ValidationError("--deadline: \(DurationText.expected) (at most 24h), got '\(deadline)'")
            }
        }
    }

    func run() async throws {
        let wait = deadline.flatMap(DurationText.parse) ?? .seconds(3600)
        let path = deadline.map { "/drain?deadline=\($0)" } ?? "/drain"
        let text = try await control.send("POST", path, timeout: wait + .seconds(10))
        let report = try JSONDecoder().decode(DrainReport.self, from: Data(text.utf8))
        if control.json {
            print(text, terminator: "")
        } else {
            let start = report.inFlightAtStart
            let left = report.remaining
            print(
                """
                draining (deadline \(Self.seconds(report.deadlineSeconds)))
                  pilot:        \(report.pilot)
                  gate:         \(report.gate)
                  idle closed:  \(report.idleClosed) connections
                  in flight:    \(start.requestsInFlight) requests, \(start.tcpRelays) TCP connections at the start
                  remaining:    \(left.requestsInFlight) requests, \(left.tcpRelays) TCP connections after \(report.waitedMilliseconds) ms
                  result:       \(report.completed ? "drained" : "deadline reached with work in flight")
                """
            )
        }
        if !report.completed { throw ExitCode(2) }
    }
}

extension Drain {
    static func seconds(_ value: Double) -> String {
        value == value.rounded() ? "\(Int(value))s" : "\(value)s"
    }
}

/// `trellis-agent reload`: the running agent reads its agent.yaml again (as SIGHUP does).
struct Reload: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Make the running agent read its agent.yaml again and apply what changed (as SIGHUP does).",
        discussion: "Exit status 0 when applied, 1 when the file was refused (the running configuration stays)."
    )

    @OptionGroup var control: ControlOptions

    func run() async throws {
        let text = try await control.send("POST", "/reload", timeout: .seconds(60))
        let report = try JSONDecoder().decode(ReloadReport.self, from: Data(text.utf8))
        if control.json {
            print(text, terminator: "")
        } else if report.applied {
            print(
                report.changes.isEmpty
                    ? "reloaded: no change" : "reloaded:\n  " + report.changes.joined(separator: "\n  ")
            )
        }
        if !report.applied {
            throw AgentCommandError("reload refused; the running configuration stays\n\(report.error ?? "")")
        }
    }
}

/// `trellis-agent undrain`: serve normally again.
struct Undrain: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Undo a drain: keep-alive again, the gate captures, pilot gets the services' health back."
    )

    @OptionGroup var control: ControlOptions

    func run() async throws {
        let text = try await control.send("POST", "/undrain", timeout: .seconds(10))
        if control.json {
            print(text, terminator: "")
            return
        }
        let report = try JSONDecoder().decode(UndrainReport.self, from: Data(text.utf8))
        print("serving\n  pilot: \(report.pilot)\n  gate:  \(report.gate)")
    }
}

/// `trellis-agent status`: what the running agent is doing.
struct Status: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Show the running agent: state, listeners, services, connections, configuration, pilot.",
        discussion: """
            With --watch, a table refreshed every --interval: per destination service the requests/s, \
            success rate, p50/p99 latency, open connections, ejections and the proxy's errors, with the \
            capture and gate counters above (computed from the agent's metrics, docs/metrics.md). \
            Ctrl-C ends it.
            """
    )

    @OptionGroup var control: ControlOptions

    @Flag(help: "Refresh a live table of the agent's traffic until interrupted.")
    var watch = false

    @Option(help: "With --watch: seconds between refreshes (0.2 to 60).")
    var interval: Double = 1

    @Option(help: "With --watch: stop after this many refreshes (0: never).")
    var iterations = 0

    func validate() throws {
        guard (0.2...60).contains(interval) else {
            throw ValidationError("--interval: expected 0.2 to 60, got \(interval)")
        }
        guard iterations >= 0 else { throw ValidationError("--iterations: expected 0 or more, got \(iterations)") }
        if watch && control.json { throw ValidationError("--watch and --json cannot be used together") }
    }

    func run() async throws {
        if watch {
            try await watchLoop()
            return
        }
        let text = try await control.send("GET", "/status", timeout: .seconds(10))
        if control.json {
            print(text, terminator: "")
            return
        }
        let s = try JSONDecoder().decode(AgentStatus.self, from: Data(text.utf8))
        var lines = ["node \(s.node): \(s.state)" + (s.drainStarted.map { " (since \($0))" } ?? "")]
        lines.append("listeners:")
        for listener in s.listeners {
            lines.append("  \(listener.name.padding(toLength: 10, withPad: " ", startingAt: 0)) \(listener.address)")
        }
        let differences =
            s.capture.differences.isEmpty ? "" : " (" + s.capture.differences.joined(separator: "; ") + ")"
        lines.append("capture: \(s.capture.rules) [\(s.capture.backend)]\(differences)")
        if let gate = s.gate {
            lines.append(
                "gate: \(gate.mode) (captured \(gate.captured), bypassed \(gate.bypassed), overflows \(gate.overflows))"
            )
        } else {
            lines.append("gate: not configured")
        }
        lines.append(
            "connections: \(s.activity.httpConnections) HTTP (\(s.activity.requestsInFlight) requests in flight), "
                + "\(s.activity.tcpRelays) TCP relayed"
        )
        lines.append("config version: \(s.configVersion)")
        lines.append("pilot: \(s.pilot.api ?? "not configured"); \(s.pilot.registration)")
        if let xds = s.xds {
            lines.append(
                "pilot xDS: \(xds.pilot) \(xds.connection); \(xds.updatesApplied) updates applied"
                    + (xds.lastNACK.map { "; last NACK: \($0)" } ?? "")
            )
        } else {
            lines.append("pilot xDS: not configured (pilot.xds in agent.yaml); passthrough only")
        }
        if s.services.isEmpty {
            lines.append("services: none declared")
        } else {
            lines.append("services:")
            for service in s.services {
                let state =
                    service.registered
                    ? (service.healthy ? "registered, healthy" : "registered, unhealthy")
                    : "not registered"
                lines.append(
                    "  \(service.name) port \(service.port) (service port \(service.servicePort)): \(state)"
                        + (service.lastError.map { "; last error: \($0)" } ?? "")
                )
            }
        }
        print(lines.joined(separator: "\n"))
    }
}

extension Status {
    /// Scrapes the agent's metrics every interval and redraws the table from the differences.
    private func watchLoop() async throws {
        var previous = LiveView.parse(try await control.send("GET", "/metrics", timeout: .seconds(10)))
        var last = ContinuousClock.now
        var drawn = 0
        while iterations == 0 || drawn < iterations {
            try await Task.sleep(for: .milliseconds(Int(interval * 1000)))
            let status = try JSONDecoder().decode(
                AgentStatus.self,
                from: Data(try await control.send("GET", "/status", timeout: .seconds(10)).utf8)
            )
            let current = LiveView.parse(try await control.send("GET", "/metrics", timeout: .seconds(10)))
            let now = ContinuousClock.now
            let elapsed = now - last
            let seconds = Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18
            func rate(_ name: String, _ labels: [String: String] = [:]) -> String {
                let value = LiveView.rate(name, previous: previous, current: current, seconds: seconds) { sample in
                    labels.allSatisfy { sample[$0.key] == $0.value }
                }
                return String(Double(Int(value * 10)) / 10)
            }
            let summary = [
                "capture: \(status.capture.rules); gate \(status.gate.map { "\($0.mode): captured \(rate("trellis_gate_connections_total", ["decision": "captured"]))/s, bypassed \(rate("trellis_gate_connections_total", ["decision": "bypassed"]))/s" } ?? "not configured")",
                "connections: \(status.activity.httpConnections) HTTP, \(status.activity.tcpRelays) TCP relayed; "
                    + "new: http1 \(rate("trellis_sniffed_connections_total", ["protocol": "http1"]))/s, "
                    + "http2 \(rate("trellis_sniffed_connections_total", ["protocol": "http2"]))/s, "
                    + "tcp \(rate("trellis_sniffed_connections_total", ["protocol": "tcp"]))/s",
                "requests: \(rate("trellis_downstream_requests_total"))/s received, "
                    + "\(status.activity.requestsInFlight) in flight; pilot xDS: \(status.xds?.connection ?? "not configured")",
            ]
            let screen = LiveView.render(
                title: "trellis-agent \(status.node): \(status.state) — every \(interval)s (Ctrl-C to stop)",
                summary: summary,
                rows: LiveView.rows(previous: previous, current: current, seconds: seconds)
            )
            // Home and clear, then the screen: one write per refresh.
            FileHandle.standardOutput.write(Data(("\u{1B}[H\u{1B}[2J" + screen).utf8))
            previous = current
            last = now
            drawn += 1
        }
    }
}
