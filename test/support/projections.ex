defmodule Kuma.Test.Counter do
  @moduledoc """
  A read model that counts events per entity by incrementing (so an event applied twice
  shows as an over-count) and records every (entity_id, seq) it saw.
  """
  use Kuma.ReadModel

  @impl true
  def schema do
    [
      "CREATE TABLE counts (entity_id TEXT PRIMARY KEY, n INTEGER NOT NULL)",
      "CREATE TABLE seen (entity_id TEXT NOT NULL, seq INTEGER NOT NULL, type TEXT NOT NULL, PRIMARY KEY (entity_id, seq))"
    ]
  end

  @impl true
  def handle_event(%Kuma.Envelope{entity_id: id, seq: seq, type: type}) do
    [
      {"INSERT INTO counts VALUES (?1, 1) ON CONFLICT(entity_id) DO UPDATE SET n = n + 1", [id]},
      {"INSERT INTO seen VALUES (?1, ?2, ?3)", [id, seq, type]}
    ]
  end
end

defmodule Kuma.Test.Collector do
  @moduledoc """
  A projection that sends every envelope it handles to the pid in its args, and raises on
  events whose data is `:poison` (to exercise retries, parking and skip).
  """
  @behaviour Kuma.Projection

  @impl true
  def init(pid), do: {:ok, pid}

  @impl true
  def handle_event(%Kuma.Envelope{data: :poison} = e, pid) do
    send(pid, {:attempt, e.entity_id, e.seq})
    raise "poisoned event"
  end

  def handle_event(envelope, pid) do
    send(pid, {:projected, envelope})
    {:ok, pid}
  end

  @impl true
  def forget(entity_id, pid) do
    send(pid, {:forgot, entity_id})
    {:ok, pid}
  end
end

defmodule Kuma.Test.Journal do
  @moduledoc """
  A projection that appends a line `entity_id seq` to the file named in its args for every
  event it handles, duplicates included: the nodes of a test cluster share one machine, so
  the file shows what the projection did wherever it ran.
  """
  @behaviour Kuma.Projection

  @impl true
  def init(path), do: {:ok, path}

  @impl true
  def handle_event(%Kuma.Envelope{entity_id: id, seq: seq}, path) do
    File.write!(path, "#{id} #{seq}\n", [:append])
    {:ok, path}
  end
end

defmodule Kuma.Test.SlowCounter do
  @moduledoc """
  `Kuma.Test.Counter`, taking a millisecond per event: widens the time a batch is being
  handled while the next one has already been read ahead.
  """
  use Kuma.ReadModel

  @impl true
  def schema, do: Kuma.Test.Counter.schema()

  @impl true
  def handle_event(envelope) do
    Process.sleep(1)
    Kuma.Test.Counter.handle_event(envelope)
  end
end

defmodule Kuma.Test.ProjectionHelpers do
  @moduledoc "Helpers shared by the projection, read model, subscription and query tests."
  import ExUnit.Assertions

  @doc "Everything committed so far, as a token."
  def heads(store) do
    {:ok, position} = Kuma.position(store)
    position
  end

  @doc "The rows of a read-model query."
  def rows(name, sql, params \\ []) do
    {:ok, %{rows: rows}} = Kuma.ReadModel.query(name, sql, params)
    rows
  end

  @doc "Every `{tag, value}` message already in the mailbox, in order."
  def drain(tag, acc \\ []) do
    receive do
      {^tag, value} -> drain(tag, [value | acc])
    after
      0 -> Enum.reverse(acc)
    end
  end

  @doc "Polls `fun` every 5 ms until it returns true (fails after ~5 s)."
  def wait_until(fun), do: assert(Kuma.StoreCase.eventually(fun, 1_000, 5), "condition never became true")

  @doc "Up to `n` `{:kuma_event, e}` messages (skipping lag notices), waiting at most 5 s for each."
  def receive_events(0, acc), do: Enum.reverse(acc)

  def receive_events(n, acc) do
    receive do
      {:kuma_event, e} -> receive_events(n - 1, [e | acc])
      {:kuma_lagged, _} -> receive_events(n, acc)
    after
      5_000 -> Enum.reverse(acc)
    end
  end
end
