import NIOCore
import NIOHTTP1
import Testing

@testable import Proxy

/// An HTTP/1 client connection as a value: pipelining, held reads, keep-alive and drain checked
/// without a socket or a clock (times are arguments).
@Suite struct HTTP1ConnectionStateMachineTests {
    typealias Machine = HTTP1ConnectionStateMachine
    let t0 = NIODeadline.uptimeNanoseconds(1_000_000_000)

    private func head(
        _ uri: String = "/",
        version: HTTPVersion = .http1_1,
        _ headers: [(String, String)] = [("host", "a")]
    ) -> RequestPart {
        .head(RequestHead(HTTPRequestHead(version: version, method: .GET, uri: uri, headers: HTTPHeaders(headers))))
    }

    private func body(_ text: String) -> RequestPart {
        .body(ByteBuffer(string: text))
    }

    private func startedURI(_ action: Machine.PartAction?) -> String? {
        if case .startExchange(let head) = action { return head.uri }
        return nil
    }

    @Test func oneKeepAliveRequestThenIdleAgain() {
        var machine = Machine(now: t0, draining: false)
        #expect(machine.idleSince == t0 && !machine.isBusy)
        let part1 = machine.received(head("/one"))
        #expect(startedURI(part1) == "/one")
        #expect(machine.isBusy && machine.idleSince == nil)
        let part2 = machine.received(.end(nil))
        #expect(part2 == .forwardEnd(nil))
        let keepsAlive1 = machine.responseHead(requestEnded: true, hasContentLength: true)
        #expect(keepsAlive1, "keep-alive")
        let ending1 = machine.responseEnded(now: t0 + .seconds(1))
        #expect(ending1 == .keepOpen)
        #expect(machine.idleSince == t0 + .seconds(1) && !machine.isBusy)
        let next1 = machine.nextQueued()
        #expect(next1 == nil)
    }

    @Test func pipelinedRequestsWaitForTheResponseBeforeThem() {
        var machine = Machine(now: t0, draining: false)
        let part3 = machine.received(head("/one"))
        #expect(startedURI(part3) == "/one")
        let part4 = machine.received(.end(nil))
        #expect(part4 == .forwardEnd(nil))
        // The second request arrives whole before the first is answered: it waits, and so do reads.
        let part5 = machine.received(head("/two"))
        #expect(part5 == .none)
        let part6 = machine.received(body("x"))
        #expect(part6 == .none)
        let part7 = machine.received(.end(nil))
        #expect(part7 == .none)
        let part8 = machine.received(head("/three"))
        #expect(part8 == .none)
        let reads1 = machine.readRequested(exchangeHoldsReads: false)
        #expect(!reads1, "held while requests wait")
        #expect(machine.readHeld)
        let next2 = machine.nextQueued()
        #expect(next2 == nil, "the first response is not done")

        _ = machine.responseHead(requestEnded: true, hasContentLength: true)
        let ending2 = machine.responseEnded(now: t0)
        #expect(ending2 == .keepOpen)
        let next3 = machine.nextQueued()
        #expect(startedURI(next3) == "/two")
        let next4 = machine.nextQueued()
        #expect(next4 == .forwardBody(ByteBuffer(string: "x")))
        let next5 = machine.nextQueued()
        #expect(next5 == .forwardEnd(nil))
        let next6 = machine.nextQueued()
        #expect(next6 == nil, "/three waits for /two's response")
        let resumes1 = machine.resumeReadingAfterResponse(exchangeHoldsReads: false)
        #expect(!resumes1, "/three still queued")

        _ = machine.responseHead(requestEnded: true, hasContentLength: true)
        let ending3 = machine.responseEnded(now: t0)
        #expect(ending3 == .keepOpen)
        let next7 = machine.nextQueued()
        #expect(startedURI(next7) == "/three")
        let next8 = machine.nextQueued()
        #expect(next8 == nil, "/three's end has not arrived")
        let resumes2 = machine.resumeReadingAfterResponse(exchangeHoldsReads: false)
        #expect(resumes2, "the held read goes on")
        #expect(!machine.readHeld)
    }

    @Test func readsHeldForTheExchangeResumeWhenItCanTakeMore() {
        var machine = Machine(now: t0, draining: false)
        _ = machine.received(head("/upload"))
        let reads2 = machine.readRequested(exchangeHoldsReads: true)
        #expect(!reads2, "the upstream is not writable")
        let resumes3 = machine.resumeReading(exchangeHoldsReads: true)
        #expect(!resumes3)
        let resumes4 = machine.resumeReading(exchangeHoldsReads: false)
        #expect(resumes4)
        let resumes5 = machine.resumeReading(exchangeHoldsReads: false)
        #expect(!resumes5, "one held read, resumed once")
        let reads3 = machine.readRequested(exchangeHoldsReads: false)
        #expect(reads3)
        _ = machine.received(.end(nil))
        let reads4 = machine.readRequested(exchangeHoldsReads: true)
        #expect(reads4, "a request read whole holds nothing")
    }

    @Test func keepAliveFollowsTheClientTheVersionAndTheBody() {
        // HTTP/1.0 without keep-alive: closes after the response.
        var old = Machine(now: t0, draining: false)
        _ = old.received(head(version: .http1_0))
        _ = old.received(.end(nil))
        let keepsAlive2 = old.responseHead(requestEnded: true, hasContentLength: true)
        #expect(!keepsAlive2)
        let ending4 = old.responseEnded(now: t0)
        #expect(ending4 == .close)
        #expect(old.isClosing)
        let part9 = old.received(head())
        #expect(part9 == .none, "nothing is started on a closing connection")

        // HTTP/1.0 with keep-alive, but a response without a length: ends with the connection.
        var oldKeep = Machine(now: t0, draining: false)
        _ = oldKeep.received(head(version: .http1_0, [("host", "a"), ("connection", "keep-alive")]))
        _ = oldKeep.received(.end(nil))
        let keepsAlive3 = oldKeep.responseHead(requestEnded: true, hasContentLength: false)
        #expect(!keepsAlive3)
        var oldKeep2 = Machine(now: t0, draining: false)
        _ = oldKeep2.received(head(version: .http1_0, [("host", "a"), ("connection", "keep-alive")]))
        _ = oldKeep2.received(.end(nil))
        let keepsAlive4 = oldKeep2.responseHead(requestEnded: true, hasContentLength: true)
        #expect(keepsAlive4)

        // `Connection: close` from the client.
        var closing = Machine(now: t0, draining: false)
        _ = closing.received(head("/", [("host", "a"), ("connection", "close")]))
        let keepsAlive5 = closing.responseHead(requestEnded: true, hasContentLength: true)
        #expect(!keepsAlive5)

        // A response that starts while the request body is still coming: the connection is unframed.
        var early = Machine(now: t0, draining: false)
        _ = early.received(head())
        let keepsAlive6 = early.responseHead(requestEnded: false, hasContentLength: true)
        #expect(!keepsAlive6)
    }

    @Test func anEarlyErrorKeepsTheConnectionOnlyWithoutABodyToSkip() {
        var noBody = Machine(now: t0, draining: false)
        _ = noBody.received(head())
        let keepsAlive7 = noBody.errorResponse(requestEnded: false, requestHasBody: false)
        #expect(keepsAlive7)
        let ending5 = noBody.responseEnded(now: t0)
        #expect(ending5 == .keepOpen)
        let part10 = noBody.received(.end(nil))
        #expect(part10 == .none, "the rest of the answered request is dropped")
        let part11 = noBody.received(head("/next"))
        #expect(startedURI(part11) == "/next")

        var withBody = Machine(now: t0, draining: false)
        _ = withBody.received(head())
        let keepsAlive8 = withBody.errorResponse(requestEnded: false, requestHasBody: true)
        #expect(!keepsAlive8)
        let ending6 = withBody.responseEnded(now: t0)
        #expect(ending6 == .close)
    }

    @Test func anAbsoluteFormTargetsAuthorityWins() {
        var machine = Machine(now: t0, draining: false)
        let action = machine.received(head("http://user@alt.example:8080/x?y=1", [("host", "ignored")]))
        guard case .startExchange(let normalized) = action else {
            Issue.record("expected an exchange, got \(action)")
            return
        }
        #expect(normalized.uri == "/x?y=1")
        #expect(normalized.fields.headers["host"] == ["alt.example:8080"])
        var bare = Machine(now: t0, draining: false)
        guard case .startExchange(let root) = bare.received(head("http://alt.example")) else {
            Issue.record("expected an exchange")
            return
        }
        #expect(root.uri == "/")
        var hostless = Machine(now: t0, draining: false)
        guard case .reject(let error) = hostless.received(head("http:///x")) else {
            Issue.record("expected a rejection")
            return
        }
        #expect(error.status == .badRequest && error.token == "bad_request")
        let ending7 = hostless.responseEnded(now: t0, close: true)
        #expect(ending7 == .close)
    }

    @Test func parseErrorsAreAnsweredInTheirTurn() {
        // Nothing being served: answered now.
        var idle = Machine(now: t0, draining: false)
        guard
            case .reject(let error) = idle.parseError(
                .badRequest("an invalid character in a field name"),
                channelActive: true
            )
        else {
            Issue.record("expected a rejection")
            return
        }
        #expect(error.status == .badRequest)

        // Mid-request (a bad chunk): the exchange answers if it can.
        var mid = Machine(now: t0, draining: false)
        _ = mid.received(head())
        guard case .failExchange = mid.parseError(.badRequest("an invalid chunk size"), channelActive: true) else {
            Issue.record("expected the exchange to fail")
            return
        }

        // A malformed pipelined request behind one being answered: deferred, and reads stop.
        var pipelined = Machine(now: t0, draining: false)
        _ = pipelined.received(head("/one"))
        _ = pipelined.received(.end(nil))
        let onError1 = pipelined.parseError(.headerTooLarge("request head larger than 60 KiB"), channelActive: true)
        #expect(onError1 == .deferred)
        let reads5 = pipelined.readRequested(exchangeHoldsReads: false)
        #expect(!reads5)
        _ = pipelined.responseHead(requestEnded: true, hasContentLength: true)
        let ending8 = pipelined.responseEnded(now: t0)
        #expect(ending8 == .keepOpen)
        guard case .reject(let late) = pipelined.nextQueued() else {
            Issue.record("expected the deferred error")
            return
        }
        #expect(late.status.code == 431 && late.token == "header_too_large")
        let ending9 = pipelined.responseEnded(now: t0, close: true)
        #expect(ending9 == .close)

        // The client left mid-request: nobody to answer.
        var gone = Machine(now: t0, draining: false)
        _ = gone.received(head())
        let onError2 = gone.parseError(.badRequest("an invalid chunk size"), channelActive: false)
        #expect(onError2 == .closeQuietly)
        let onError3 = gone.parseError(.badRequest("an invalid chunk size"), channelActive: true)
        #expect(onError3 == .none, "already closing")
    }

    @Test func drainClosesOnlyAConnectionQuietLongEnough() {
        let quiet = TimeAmount.seconds(1)
        var machine = Machine(now: t0, draining: false)
        let closesNow1 = machine.drain(quiet: quiet, now: t0 + .milliseconds(500))
        #expect(!closesNow1, "idle for half the quiet period")
        #expect(machine.draining)
        let closesNow2 = machine.drain(quiet: quiet, now: t0 + .seconds(1))
        #expect(closesNow2)
        #expect(machine.isClosing)
        let closesNow3 = machine.drain(quiet: quiet, now: t0 + .seconds(5))
        #expect(!closesNow3, "closed once")

        // Busy when the drain starts: its response closes the connection, keep-alive or not.
        var busy = Machine(now: t0, draining: false)
        _ = busy.received(head())
        _ = busy.received(.end(nil))
        let keepsAlive9 = busy.responseHead(requestEnded: true, hasContentLength: true)
        #expect(keepsAlive9, "head sent before the drain")
        let closesNow4 = busy.drain(quiet: quiet, now: t0 + .seconds(10))
        #expect(!closesNow4)
        let ending10 = busy.responseEnded(now: t0 + .seconds(10))
        #expect(ending10 == .close)

        // Opened while draining: its first response already says close.
        var late = Machine(now: t0, draining: true)
        _ = late.received(head())
        _ = late.received(.end(nil))
        let keepsAlive10 = late.responseHead(requestEnded: true, hasContentLength: true)
        #expect(!keepsAlive10)

        // Drain called off: keep-alive again.
        var undrained = Machine(now: t0, draining: true)
        undrained.stopDrain()
        _ = undrained.received(head())
        _ = undrained.received(.end(nil))
        let keepsAlive11 = undrained.responseHead(requestEnded: true, hasContentLength: true)
        #expect(keepsAlive11)
        let ending11 = undrained.responseEnded(now: t0)
        #expect(ending11 == .keepOpen)
    }

    @Test func closeAndAbortEndEverything() {
        var machine = Machine(now: t0, draining: false)
        _ = machine.received(head())
        let aborted1 = machine.abort()
        #expect(aborted1)
        let aborted2 = machine.abort()
        #expect(!aborted2, "once")
        let ending12 = machine.responseEnded(now: t0)
        #expect(ending12 == .none, "nothing written after an abort")
        var served = Machine(now: t0, draining: false)
        _ = served.received(head())
        let hadExchange1 = served.closed()
        #expect(hadExchange1, "the exchange must hear the client left")
        var idle = Machine(now: t0, draining: false)
        let hadExchange2 = idle.closed()
        #expect(!hadExchange2)
    }
}
