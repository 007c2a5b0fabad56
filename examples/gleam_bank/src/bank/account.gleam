//// A bank account as a Kuma aggregate, in Gleam: `init`, `handle` and `apply` are all
//// Kuma needs (the store is started with `kuma.Aggregates(["bank@account"])`).

import kuma/aggregate.{type Aggregate}

/// This module as an aggregate, with its types.
pub fn aggregate() -> Aggregate(Account, Command, Event, AccountError) {
  aggregate.named("bank@account")
}

pub type Account {
  Account(open: Bool, balance: Int, limit: Int)
}

pub type Command {
  Open(balance: Int, limit: Int)
  Deposit(amount: Int)
  Withdraw(amount: Int)
  /// A saga's compensation: money that left this account comes back, never refused.
  Refund(amount: Int)
  Close
}

pub type Event {
  Opened(balance: Int, limit: Int)
  Deposited(amount: Int)
  Withdrawn(amount: Int)
  Refunded(amount: Int)
  Closed
}

pub type AccountError {
  AlreadyOpen
  NotOpen
  OverLimit
  InsufficientFunds
}

pub fn init(_id: String) -> Account {
  Account(open: False, balance: 0, limit: 0)
}

pub fn handle(
  account: Account,
  command: Command,
) -> Result(List(Event), AccountError) {
  case command, account.open {
    Open(balance:, limit:), False -> Ok([Opened(balance:, limit:)])
    Open(..), True -> Error(AlreadyOpen)
    Refund(amount:), _ -> Ok([Refunded(amount:)])
    _, False -> Error(NotOpen)
    Close, True -> Ok([Closed])
    Deposit(amount:), True ->
      case account.balance + amount > account.limit {
        True -> Error(OverLimit)
        False -> Ok([Deposited(amount:)])
      }
    Withdraw(amount:), True ->
      case amount > account.balance {
        True -> Error(InsufficientFunds)
        False -> Ok([Withdrawn(amount:)])
      }
  }
}

pub fn apply(account: Account, event: Event) -> Account {
  case event {
    Opened(balance:, limit:) -> Account(open: True, balance:, limit:)
    Deposited(amount:) | Refunded(amount:) ->
      Account(..account, balance: account.balance + amount)
    Withdrawn(amount:) -> Account(..account, balance: account.balance - amount)
    Closed -> Account(..account, open: False)
  }
}
