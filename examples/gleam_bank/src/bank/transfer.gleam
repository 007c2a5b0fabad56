//// The transfer saga: debit `from`, credit `to`; if the credit fails (a closed account,
//// over its limit), refund `from`. Run with `saga.run(store, saga: "bank@transfer", ...)`.

import bank/account.{type Command, Deposit, Refund, Withdraw}
import kuma/saga.{type Step, Step}

pub type Transfer {
  Transfer(from: String, to: String, amount: Int)
}

pub type TransferStep {
  Debit
  Credit
}

pub fn steps(t: Transfer) -> List(Step(TransferStep, Command)) {
  [
    Step(Debit, #("bank@account", t.from, Withdraw(t.amount)), undo: [
      #("bank@account", t.from, Refund(t.amount)),
    ]),
    Step(Credit, #("bank@account", t.to, Deposit(t.amount)), undo: []),
  ]
}
