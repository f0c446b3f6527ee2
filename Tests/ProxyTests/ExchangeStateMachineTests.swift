import Testing

@testable import Proxy

/// The exchange's tries as a value: each event's meaning checked without a socket or a timer.
@Suite struct ExchangeStateMachineTests {
    @Test func aConnectionForAnAbandonedTryIsGivenBack() {
        var machine = ExchangeStateMachine()
        #expect(machine.isConnecting(attempt: 1))
        _ = machine.retrying()  // try 1 failed (a per-try timeout while connecting, say)
        machine.tryStarted()
        let late = machine.connected(attempt: 1, reused: false)
        #expect(late == .giveBack, "try 1's connection came late")
        let current = machine.connected(attempt: 2, reused: true)
        #expect(current == .send)
        #expect(machine.phase == .streaming && machine.attached && machine.reused)
        let extra = machine.connected(attempt: 2, reused: false)
        #expect(extra == .giveBack, "already streaming")
    }

    @Test func aStaleConnectionIsWorthOneMoreTryOnly() {
        var machine = ExchangeStateMachine()
        _ = machine.connected(attempt: 1, reused: true)
        #expect(machine.maySendAgain)
        machine.sendingAgain()
        #expect(machine.phase == .connecting && !machine.attached && machine.tries == 1)
        let renewed = machine.connected(attempt: 1, reused: true)
        #expect(renewed == .send)
        #expect(!machine.maySendAgain, "once")
        var fresh = ExchangeStateMachine()
        _ = fresh.connected(attempt: 1, reused: false)
        #expect(!fresh.maySendAgain, "a new connection cannot have gone stale")
        var answered = ExchangeStateMachine()
        _ = answered.connected(attempt: 1, reused: true)
        answered.responseForwarded()
        #expect(!answered.maySendAgain, "part of the answer went out")
    }

    @Test func retriesCountTriesAndFeedTheDecision() {
        var machine = ExchangeStateMachine()
        _ = machine.connected(attempt: 1, reused: false)
        let first = machine.retryDecision(requestRetained: true, idempotent: false)
        #expect(
            first
                == RetryDecision(
                    tries: 1,
                    responseStarted: false,
                    requestRetained: true,
                    attached: true,
                    idempotent: false
                )
        )
        let retry = machine.retrying()
        #expect(retry == 1)
        #expect(machine.isBackingOff && !machine.attached)
        #expect(!machine.perTryTimeoutApplies(attempt: 1), "try 1 is over")
        machine.tryStarted()
        #expect(machine.perTryTimeoutApplies(attempt: 2))
        let again = machine.retrying()
        #expect(again == 2)
        #expect(machine.tries == 3)
    }

    @Test func finishingIsOnceAndFinal() {
        var machine = ExchangeStateMachine()
        let first = machine.finish()
        let second = machine.finish()
        #expect(first && !second)
        machine.tryStarted()
        #expect(machine.phase == .finished, "nothing restarts a finished exchange")
        let late = machine.connected(attempt: 1, reused: false)
        #expect(late == .giveBack)
        #expect(!machine.perTryTimeoutApplies(attempt: 1))
    }
}
