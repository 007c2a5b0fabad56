defmodule Kuma.Aggregate do
  @moduledoc """
  The behaviour of an entity type: how its state starts, how events change it, and
  (optionally) how commands decide which events to write.

  An aggregate is pure: `handle/2` looks at the current state and a command and returns
  the events to append (or an error), `apply/2` folds one event into the state. Kuma runs
  them inside the entity's process, which is the only writer of the entity's stream.

      defmodule Bank.Account do
        @behaviour Kuma.Aggregate
        defstruct id: nil, balance: 0

        defmodule Deposited, do: defstruct([:amount])
        defmodule Withdrawn, do: defstruct([:amount])

        @impl true
        def init(id), do: %__MODULE__{id: id}

        @impl true
        def handle(_account, {:deposit, amount}) when amount > 0, do: {:ok, [%Deposited{amount: amount}]}
        def handle(%{balance: b}, {:withdraw, amount}) when amount > b, do: {:error, :insufficient_funds}
        def handle(_account, {:withdraw, amount}) when amount > 0, do: {:ok, [%Withdrawn{amount: amount}]}

        @impl true
        def apply(account, %Deposited{amount: a}), do: %{account | balance: account.balance + a}
        def apply(account, %Withdrawn{amount: a}), do: %{account | balance: account.balance - a}
      end

      {:ok, store} = Kuma.start(name: :bank, data_dir: "data", aggregates: [Bank.Account])
      alice = Kuma.entity(store, Bank.Account, "account:alice")
      {:ok, 1} = Kuma.execute(alice, {:deposit, 50})
      %Bank.Account{balance: 50} = Kuma.read(alice)

  ## Callbacks

  * `init/1` - the state of an entity with no events.
  * `apply/2` - the state after one event. Must not fail for events the aggregate wrote;
    if it raises while loading, the load fails with `{:replay_failed, seq, reason}`.
  * `handle/2` (optional) - decides a command: `{:ok, events}` (a list, possibly empty, or
    a single event) or `{:error, reason}`. Without it, `Kuma.execute/3` returns
    `{:error, {:no_handle, aggregate}}`.
  * `snapshot_version/0` (optional, default 1) - bump it when the state's shape changes:
    snapshots of another version are ignored and the state is rebuilt from events. A
    positive integer of at most 32 bits (0 marks the snapshots of `Kuma.Snapshots`).
  * `upcast/2` (optional) - turns an event stored in an old shape into the current shape
    before `apply/2` and in `Kuma.history/2`; storage is never rewritten. It receives the
    event and its `Kuma.Envelope` (for the type, seq, timestamp and metadata).

  Ids must be unique across the aggregates of a store: an entity id names one stream.
  A good habit is a prefix per aggregate (`"account:alice"`, `"user:alice"`).
  """

  @type state :: term()
  @type event :: term()
  @type command :: term()

  @callback init(entity_id :: binary()) :: state()
  @callback apply(state(), event()) :: state()
  @callback handle(state(), command()) :: {:ok, event() | [event()]} | {:error, term()}
  @callback snapshot_version() :: pos_integer()
  @callback upcast(event(), Kuma.Envelope.t()) :: event()

  @optional_callbacks handle: 2, snapshot_version: 0, upcast: 2

  @doc false
  # Checks that a module can serve as an aggregate.
  @spec validate(module()) :: :ok | {:error, term()}
  def validate(module) when is_atom(module) do
    cond do
      not Code.ensure_loaded?(module) -> {:error, {:invalid, :aggregates, "#{inspect(module)} is not a module"}}
      not function_exported?(module, :init, 1) -> {:error, {:invalid, :aggregates, "#{inspect(module)} lacks init/1"}}
      not function_exported?(module, :apply, 2) -> {:error, {:invalid, :aggregates, "#{inspect(module)} lacks apply/2"}}
      not (is_integer(v = snapshot_version(module)) and v in 1..0xFFFFFFFF) -> bad_version(module)
      true -> :ok
    end
  end

  def validate(other), do: {:error, {:invalid, :aggregates, "not a module: #{inspect(other)}"}}

  # 0 marks the snapshots frameworks save (Kuma.Snapshots); the column holds 32 bits.
  defp bad_version(module) do
    {:error,
     {:invalid, :aggregates,
      "#{inspect(module)}.snapshot_version/0 must return an integer from 1 to 4,294,967,295 (0 is kept for framework snapshots)"}}
  end

  @doc false
  def snapshot_version(module) do
    if function_exported?(module, :snapshot_version, 0), do: module.snapshot_version(), else: 1
  end
end
