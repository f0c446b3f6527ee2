import NIOCore
import NIOHTTP1
import Testing
import W3CTraceContext

@testable import Proxy

/// Reading and writing trace headers, without a tracer: what the data path does for every request
/// when tracing is on, sampled or not.
@Suite struct TraceHeadersTests {
    /// The caller's context as the data path reads it: from the fields a request context noted
    /// in its one pass over the headers.
    static func incoming(_ headers: HTTPHeaders) -> TraceHeaders.Incoming? { request(headers).arrivedTrace }

    static func request(_ headers: HTTPHeaders) -> RequestContext {
        let head = HTTPRequestHead(version: .http1_1, method: .GET, uri: "/", headers: headers)
        return RequestContext(
            head: RequestHead(head),
            listenerName: "l",
            remoteAddress: nil,
            clientIP: nil,
            startTime: .now()
        )
    }

    /// 50 random contexts with each of `flags`.
    static func randomContexts(seed: UInt64, flags: [TraceFlags]) -> [TraceContext] {
        var rng = FastRandom(seed: seed)
        return flags.flatMap { flags in
            (0..<50).map { _ in
                TraceContext(
                    traceID: .random(using: &rng),
                    spanID: .random(using: &rng),
                    flags: flags,
                    state: TraceState()
                )
            }
        }
    }

    @Test func traceparentIsWrittenAsW3CWritesIt() {
        for context in Self.randomContexts(seed: 7, flags: [TraceFlags(), .sampled]) {
            // The integers the data path keeps go back and forth without loss.
            let ids = TraceHeaders.ids(parsing: context.traceParentHeaderValue)
            #expect(ids.map(TraceHeaders.traceparent) == context.traceParentHeaderValue)
            #expect(ids?.traceIDHex == context.traceID.description && ids?.spanIDHex == context.spanID.description)
            #expect(ids?.flags == context.flags.rawValue)
        }
        var rng = FastRandom(seed: 3)
        for _ in 0..<100 {
            let ids = TraceIDs.random(&rng)
            #expect(!ids.sampled && TraceHeaders.ids(parsing: TraceHeaders.traceparent(ids)) == ids)
        }
    }

    @Test func traceparentIsReadAsW3CReadsIt() {
        var values = Self.randomContexts(seed: 11, flags: [TraceFlags(), .sampled, TraceFlags(rawValue: 0xff)]).map(
            \.traceParentHeaderValue
        )
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        values += [
            good, String(good.dropLast()), good + "0", "01" + good.dropFirst(2), good.uppercased(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0x",
            "", "00-é4bf92f3577b34da6a3ce929d0e0e47-00f067aa0ba902b7-01",
        ]
        for value in values {
            let library = try? TraceContext(traceParentHeaderValue: value)
            let ours = TraceHeaders.ids(parsing: value)
            #expect(ours.map(TraceHeaders.traceparent) == library?.traceParentHeaderValue, "\(value)")
            #expect(ours?.flags == library?.flags.rawValue, "\(value)")
        }
    }

    @Test func theCallersContextIsReadWhateverTheCaseOfTheNames() throws {
        let headers = HTTPHeaders([
            ("Host", "orders"), ("User-Agent", "x"),
            ("TraceParent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            ("TRACESTATE", "vendor=a"), ("X-Request-Id", "r"),
        ])
        let request = Self.request(headers)
        let incoming = try #require(request.arrivedTrace)
        #expect(incoming.sampled == true)
        #expect(
            incoming.ids.traceIDHex == "4bf92f3577b34da6a3ce929d0e0e4736"
                && incoming.ids.spanIDHex == "00f067aa0ba902b7"
        )
        #expect(request.arrivedTraceState == "vendor=a")
    }

    /// Ids are decoded eight hex digits at a time: against a plain decoder, for seeded random
    /// 16-character texts, valid and with a stray byte (upper case, `g`, punctuation, a
    /// control or non-ASCII byte) anywhere.
    @Test func hexIdsAreDecodedAsDigitByDigit() {
        var rng = FastRandom(seed: 0x4E8_16)
        let digits = Array("0123456789abcdef".utf8)
        let strays = Array("AFG:/ `g\u{0}\u{7F}".utf8) + [0x80, 0xB0, 0xE6, 0xFF]
        var invalid = 0
        for _ in 0..<5000 {
            var text = (0..<16).map { _ in digits.randomElement(using: &rng)! }
            if Bool.random(using: &rng) {
                text[Int.random(in: 0..<16, using: &rng)] = strays.randomElement(using: &rng)!
            }
            let expected = UInt64(String(decoding: text, as: UTF8.self), radix: 16).flatMap {
                text.allSatisfy(digits.contains) ? $0 : nil
            }
            let got = text.withUnsafeBufferPointer { TraceHeaders.hex16($0.baseAddress!) }
            #expect(got == expected, "\(String(decoding: text, as: UTF8.self).debugDescription)")
            if expected == nil { invalid += 1 }
        }
        #expect(invalid > 1500 && invalid < 3500)
    }

    /// The request context reads the headers once for the exchange: the caller's trace fields,
    /// its request id (the first, unless empty: then the proxy makes one) and whether it is gRPC
    /// (the first `content-type`), as the request arrived.
    @Test func theRequestContextReadsWhatTheExchangeNeedsInOnePass() throws {
        let head = HTTPRequestHead(
            version: .http1_1,
            method: .POST,
            uri: "/pkg.Svc/Call",
            headers: HTTPHeaders([
                ("Host", "orders"), ("Content-Type", "application/grpc+proto"), ("content-type", "text/plain"),
                ("X-Request-Id", "r-1"), ("x-request-id", "r-2"),
                ("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"),
            ])
        )
        let request = RequestContext(
            head: RequestHead(head),
            listenerName: "l",
            remoteAddress: nil,
            clientIP: nil,
            startTime: .now()
        )
        #expect(request.isGRPC)
        #expect(request.arrivedRequestID == "r-1")
        let trace = try #require(request.arrivedTrace)
        #expect(trace.w3c && trace.sampled == false && trace.ids.spanIDHex == "00f067aa0ba902b7")

        let plain = RequestContext(
            head: RequestHead(
                HTTPRequestHead(
                    version: .http1_1,
                    method: .GET,
                    uri: "/",
                    headers: HTTPHeaders([
                        ("x-request-id", ""), ("X-Request-ID", "later"), ("content-type", "text/plain"),
                    ])
                )
            ),
            listenerName: "l",
            remoteAddress: nil,
            clientIP: nil,
            startTime: .now()
        )
        #expect(!plain.isGRPC)
        #expect(plain.arrivedRequestID == nil, "an empty first id: the proxy makes one, as before")
        #expect(plain.arrivedTrace == nil)
    }

    @Test func b3IsReadAndBadHeadersStartANewTrace() throws {
        let multi = try #require(
            Self.incoming(
                HTTPHeaders([
                    ("X-B3-TraceId", "A3CE929D0E0E4736"), ("X-B3-SpanId", "00f067aa0ba902b7"), ("X-B3-Sampled", "0"),
                ])
            )
        )
        #expect(multi.ids.traceIDHex == "0000000000000000a3ce929d0e0e4736" && multi.sampled == false)
        let deferred = try #require(Self.incoming(HTTPHeaders([("b3", "a3ce929d0e0e4736-00f067aa0ba902b7")])))
        #expect(deferred.sampled == nil, "no decision: the proxy takes it")
        let debug = try #require(
            Self.incoming(
                HTTPHeaders([
                    ("x-b3-traceid", "a3ce929d0e0e4736"), ("x-b3-spanid", "00f067aa0ba902b7"), ("x-b3-flags", "1"),
                ])
            )
        )
        #expect(debug.sampled == true)
        for bad in [
            [("traceparent", "00-00000000000000000000000000000000-00f067aa0ba902b7-01")],  // zero trace id
            [("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7")],  // no flags
            [("b3", "xyz-00f067aa0ba902b7-1")], [("b3", "1")], [("x-b3-traceid", "a3ce929d0e0e4736")],
        ] {
            #expect(Self.incoming(HTTPHeaders(bad)) == nil, "\(bad)")
        }
    }
}
