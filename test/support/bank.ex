defmodule Bank.Account do
  @moduledoc "A bank account aggregate for tests and docs."
  @behaviour Kuma.Aggregate

  defstruct id: nil, balance: 0, version: 0

  defmodule Deposited do
    @moduledoc false
    defstruct [:amount]
  end

  defmodule Withdrawn do
    @moduledoc false
    defstruct [:amount]
  end

  @impl true
  def init(id), do: %__MODULE__{id: id}

  @impl true
  def handle(_account, {:deposit, amount}) when is_integer(amount) and amount > 0,
    do: {:ok, [%Deposited{amount: amount}]}

  def handle(%{balance: balance}, {:withdraw, amount}) when is_integer(amount) and amount > balance,
    do: {:error, :insufficient_funds}

  def handle(_account, {:withdraw, amount}) when is_integer(amount) and amount > 0,
    do: {:ok, %Withdrawn{amount: amount}}

  def handle(_account, :noop), do: {:ok, []}
  # A command whose event the aggregate cannot apply: apply/2 raises on it.
  def handle(_account, :poison), do: {:ok, [%Deposited{amount: 1}, %Deposited{amount: :poison}]}
  def handle(_account, :crash), do: raise("handle blew up")
  def handle(_account, _command), do: {:error, :unknown_command}

  @impl true
  def apply(account, %Deposited{amount: a}), do: %{account | balance: account.balance + a, version: account.version + 1}
  def apply(account, %Withdrawn{amount: a}), do: %{account | balance: account.balance - a, version: account.version + 1}

  # Version 1 of this aggregate stored deposits as {:credited, amount}.
  @impl true
  def upcast({:credited, amount}, _envelope), do: %Deposited{amount: amount}
  def upcast(event, _envelope), do: event
end

defmodule Bank.Ledger do
  @moduledoc "An aggregate without handle/2, for tests: counts events."
  @behaviour Kuma.Aggregate

  @impl true
  def init(_id), do: 0

  @impl true
  def apply(count, _event), do: count + 1
end

defmodule Bank.AccountV2 do
  @moduledoc "Bank.Account with a new snapshot version (its state shape changed)."
  @behaviour Kuma.Aggregate

  @impl true
  def init(id), do: Bank.Account.init(id)
  @impl true
  def apply(account, event), do: Bank.Account.apply(account, event)
  @impl true
  def handle(account, command), do: Bank.Account.handle(account, command)
  @impl true
  def snapshot_version, do: 2
end

defmodule Bank.Payments do
  @moduledoc "An aggregate whose events and state name other people (Kuma.Sensitive), for tests."
  @behaviour Kuma.Aggregate

  @impl true
  def init(_id), do: %{payees: [], total: 0}

  @impl true
  def handle(_state, {:pay, payee_id, name, amount}),
    do: {:ok, {:paid, %{to: Kuma.sensitive(payee_id, name, placeholder: "[erased]"), amount: amount}}}

  @impl true
  def apply(state, {:paid, %{to: to, amount: amount}}),
    do: %{state | payees: [to | state.payees], total: state.total + amount}

  @doc "The payees' names as the state shows them now."
  def names(state), do: Enum.map(state.payees, &Kuma.Sensitive.value/1)
end
