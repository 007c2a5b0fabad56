# The bank of Kuma's product pages: an account aggregate and the transfer saga (debit one
# account, credit another, refund the first if the credit fails). Used by
# examples/bank/transfers.exs and by the saga tests (test/kuma/saga_test.exs), which load
# this file as it is.

defmodule BankExample.Account do
  @moduledoc """
  An account: opened with a balance and a limit (the most it may hold), closed for good.
  Deposits to a closed account, or that would take it over its limit, are refused;
  withdrawals beyond the balance too. A refund (a saga's compensation) is never refused:
  it returns money that left this account.
  """
  @behaviour Kuma.Aggregate

  defstruct open?: false, closed?: false, balance: 0, limit: 0

  @impl true
  def init(_id), do: %__MODULE__{}

  @impl true
  def handle(%{open?: false, closed?: false}, {:open, balance, limit}), do: {:ok, [{:opened, balance, limit}]}
  def handle(_account, {:open, _balance, _limit}), do: {:error, :already_opened}
  # A refund is never refused (closed or full): it returns money that left this account.
  def handle(%{open?: false, closed?: false}, {:refund, _amount}), do: {:error, :account_closed}
  def handle(_account, {:refund, amount}) when amount > 0, do: {:ok, [{:refunded, amount}]}
  def handle(%{open?: false}, _command), do: {:error, :account_closed}
  def handle(_account, :close), do: {:ok, [:closed]}
  def handle(%{balance: b, limit: l}, {:deposit, amount}) when b + amount > l, do: {:error, :over_limit}
  def handle(_account, {:deposit, amount}) when amount > 0, do: {:ok, [{:deposited, amount}]}
  def handle(%{balance: b}, {:withdraw, amount}) when amount > b, do: {:error, :insufficient_funds}
  def handle(_account, {:withdraw, amount}) when amount > 0, do: {:ok, [{:withdrawn, amount}]}
  def handle(_account, command), do: {:error, {:unknown_command, command}}

  @impl true
  def apply(a, {:opened, balance, limit}), do: %{a | open?: true, balance: balance, limit: limit}
  def apply(a, :closed), do: %{a | open?: false, closed?: true}
  def apply(a, {:deposited, amount}), do: %{a | balance: a.balance + amount}
  def apply(a, {:withdrawn, amount}), do: %{a | balance: a.balance - amount}
  def apply(a, {:refunded, amount}), do: %{a | balance: a.balance + amount}
end

defmodule BankExample.Transfer do
  @moduledoc "The transfer saga: debit `from`, credit `to`; if the credit fails, refund `from`."
  @behaviour Kuma.Saga

  alias BankExample.Account

  @impl true
  def steps(%{from: from, to: to, amount: amount}) do
    [
      {:debit, {Account, from, {:withdraw, amount}}, {Account, from, {:refund, amount}}},
      {:credit, {Account, to, {:deposit, amount}}}
    ]
  end
end
