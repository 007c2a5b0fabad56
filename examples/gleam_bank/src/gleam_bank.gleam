//// The Gleam bank, against a real store: open accounts, move money with the transfer
//// saga (one to a closed account, one over a limit), and check the total.
//// `mix run examples/gleam_bank/run.exs` builds and runs it.

import bank/account.{type Account, type AccountError, type Command, type Event}
import bank/transfer.{type TransferStep, Transfer}
import kuma
import kuma/entity.{type Entity}
import kuma/saga.{type Outcome}

pub type Summary {
  Summary(completed: Int, compensated: Int, total: Int)
}

fn account(
  store: kuma.Store,
  id: String,
) -> Entity(Account, Command, Event, AccountError) {
  entity.of(store, aggregate: account.aggregate(), id: id)
}

pub fn run(data_dir: String) -> Result(Summary, kuma.KumaError) {
  let options = [
    kuma.DataDir(data_dir),
    kuma.Shards(4),
    kuma.Name("gleam_bank"),
    kuma.Aggregates(["bank@account"]),
  ]
  case kuma.start_with(options) {
    Error(error) -> Error(error)
    Ok(store) -> {
      // A second run finds the accounts opened (and carol closed) and the sagas ended:
      // it changes nothing and reports the same.
      once(entity.execute(account(store, "alice"), account.Open(100, 1000)))
      once(entity.execute(account(store, "bob"), account.Open(0, 50)))
      once(entity.execute(account(store, "carol"), account.Open(0, 1000)))
      once(entity.execute(account(store, "carol"), account.Close))
      let transfers = [
        #("t1", Transfer(from: "alice", to: "bob", amount: 30)),
        #("t2", Transfer(from: "alice", to: "bob", amount: 40)),
        #("t3", Transfer(from: "alice", to: "carol", amount: 10)),
      ]
      let outcomes = run_all(store, transfers, [])
      let completed = count(outcomes, True, 0)
      let compensated = count(outcomes, False, 0)
      let total =
        balance(store, "alice")
        + balance(store, "bob")
        + balance(store, "carol")
      let assert Ok(Nil) = kuma.stop(store)
      Ok(Summary(completed:, compensated:, total:))
    }
  }
}

fn once(result: Result(Int, entity.ExecuteError(AccountError))) -> Nil {
  case result {
    Ok(_)
    | Error(entity.Rejected(account.AlreadyOpen))
    | Error(entity.Rejected(account.NotOpen)) -> Nil
    Error(error) -> panic as { "unexpected: " <> describe(error) }
  }
}

fn describe(error: entity.ExecuteError(AccountError)) -> String {
  case error {
    entity.Rejected(_) -> "the account refused"
    entity.Failed(kuma.Other(message)) -> message
    entity.Failed(_) -> "Kuma failed"
  }
}

fn run_all(
  store: kuma.Store,
  transfers: List(#(String, transfer.Transfer)),
  acc: List(Outcome(TransferStep, AccountError)),
) -> List(Outcome(TransferStep, AccountError)) {
  case transfers {
    [] -> acc
    [#(id, t), ..rest] -> {
      let assert Ok(outcome) =
        saga.run(store, saga: "bank@transfer", id: id, args: t)
      run_all(store, rest, [outcome, ..acc])
    }
  }
}

fn count(outcomes: List(Outcome(a, b)), completed: Bool, n: Int) -> Int {
  case outcomes {
    [] -> n
    [saga.Completed, ..rest] if completed -> count(rest, completed, n + 1)
    [saga.Compensated(..), ..rest] if !completed ->
      count(rest, completed, n + 1)
    [_, ..rest] -> count(rest, completed, n)
  }
}

fn balance(store: kuma.Store, id: String) -> Int {
  let assert Ok(state) = entity.read(account(store, id))
  state.balance
}
