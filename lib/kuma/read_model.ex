defmodule Kuma.ReadModel do
  @moduledoc """
  A projection that keeps rows in its own SQLite database, written by SQL you give, and
  queried with `query/3`. This is where reads across entities come from: Kuma is not a
  query engine over its event log, but every question you can answer with SQL over rows
  derived from events is one read model away.

      defmodule MyApp.Balances do
        use Kuma.ReadModel

        @impl true
        def schema do
          ["CREATE TABLE balances (entity_id TEXT PRIMARY KEY, balance INTEGER NOT NULL)"]
        end

        @impl true
        def handle_event(%Kuma.Envelope{entity_id: id, data: {:deposited, amount}}) do
          [{"INSERT INTO balances VALUES (?1, ?2)
              ON CONFLICT(entity_id) DO UPDATE SET balance = balance + ?2", [id, amount]}]
        end

        def handle_event(_other), do: []
      end

      {:ok, _} = Kuma.ReadModel.start(store, MyApp.Balances, name: :balances)
      {:ok, %{rows: [[120]]}} = Kuma.ReadModel.query(:balances, "SELECT balance FROM balances WHERE entity_id = ?", ["alice"])

  ## Exactly once in effect

  The statements of a batch of events and the read model's checkpoint are committed in
  one SQLite transaction. After a crash (even `kill -9`), the read model resumes from a
  checkpoint that matches its rows exactly, so no event is applied twice or lost.

  ## Callbacks

  * `schema/0` - SQL statements run once, when the database is created (and again after
    `Kuma.Projection.rebuild/1`)
  * `handle_event/1` - the statements for one event: a list of `{sql, params}` (or one
    such tuple, or `[]`). Parameters: integers, floats, binaries (stored as TEXT when valid
    UTF-8, else BLOB; `{:blob, binary}` forces BLOB), `nil`, booleans (1/0), and
    `%Kuma.Sensitive{}` values (stored sealed; see "Erasure")
  * `forget/1` - the statements that remove an erased entity (see "Erasure")
  * `filter/0` - default filter options, as for `Kuma.Projection.start/3`

  A statement that fails (bad SQL, a constraint) fails its event: everything before it is
  committed, nothing of it is, and the event is retried, then parked or the read model
  stops (`:on_error`), exactly as for projections. `Kuma.Projection.status/1` shows the
  error. Tables whose names start with `_kuma_` are Kuma's.

  ## Erasure

  `Kuma.delete/2` runs `forget/1` in the read model. The default (from `use
  Kuma.ReadModel`) deletes, in every table with a column named `entity_id`, the rows whose
  `entity_id` is the erased id; override it when rows are keyed otherwise. Deleted rows are
  zeroed (`secure_delete`) and the WAL is truncated, as in the shards.

  Rows about *another* entity can hold the erased subject's data too: Bob's transfer row
  names Alice. `forget/1` does not reach those. Store such values as the
  `%Kuma.Sensitive{}` the event carries (or one you make with `Kuma.sensitive/3`), not
  their clear value: the cell keeps the sealed bytes, `query/4` opens them with the
  subject's key, and after the subject's erasure it answers the placeholder instead. SQL
  cannot compare or search such cells; key rows by ids.

  What a read model author must do, in short: key rows about an entity by its id in a
  column named `entity_id` (or write `forget/1`), and pass every value about another
  person as a `Kuma.Sensitive`.

  ## Files and backups

  A read model's file is a plain SQLite file (mode `0o600`): what it holds in clear, a
  copy of it holds in clear, and erasing an entity later removes its rows from the live
  file only, not from a backup taken before. The promise that erased data cannot be read
  from old backups holds for the shards and for sealed cells (values stored as
  `Kuma.Sensitive`, whose key is destroyed), not for clear rows of an old read-model file.
  Two ways to keep it:

  * keep personal values in sealed cells: `Kuma.sensitive(id, value)` for an entity's own
    data in its own row works too (the subject is the entity itself);
  * keep read models out of backups: they are derived data, rebuilt from the events with
    `Kuma.Projection.rebuild/1`. The store's `:projections_dir` option (or this read
    model's `:path`) puts their files outside the directory you back up.

  After restoring a store, rebuild its read models rather than restoring their files: a
  read model's file from before an erasure still has the erased entity's clear rows, and
  nothing runs `forget/1` for it again.

  ## Queries

  `query/3` runs on a separate read-only connection and never waits for the projection's
  writes; it sees committed batches only. It runs in the caller, on a dirty IO scheduler.
  """

  alias Kuma.{Native, Store}

  @doc "SQL statements creating the read model's tables."
  @callback schema() :: [String.t()] | String.t()

  @doc "The statements one event turns into."
  @callback handle_event(Kuma.Envelope.t()) :: [statement()] | statement()

  @doc "The statements removing an erased entity, or `:default`."
  @callback forget(entity_id :: binary()) :: [statement()] | :default

  @doc "Default filter options."
  @callback filter() :: keyword()

  @optional_callbacks filter: 0

  @type statement :: {String.t(), [term()]}

  defmacro __using__(_opts) do
    quote do
      @behaviour Kuma.ReadModel

      @impl Kuma.ReadModel
      def forget(_entity_id), do: :default

      defoverridable forget: 1
    end
  end

  @doc """
  Starts a read model of `store` (options as `Kuma.Projection.start/3`). Its database is
  `<projections_dir>/<name>.sqlite` (by default `<data_dir>/projections/`) unless `:path`
  says otherwise. An invalid schema
  gives `{:error, {:invalid_schema, module, reason}}`.
  """
  @spec start(Kuma.store(), module(), keyword()) :: {:ok, pid()} | {:error, term()}
  def start(store, module, opts \\ []) do
    with {:ok, s} <- Store.lookup(store),
         {:ok, spec} <- Kuma.Projection.Spec.new(s, :read_model, module, opts) do
      Kuma.Projection.start_spec(s, spec, opts)
    end
  end

  @doc """
  Runs a query on the read model `name`: `{:ok, %{columns: [...], rows: [[...]]}}`, values as
  integers, floats, binaries or `nil`; a cell that holds a `Kuma.Sensitive` answers its
  value, or its placeholder once its subject is erased. Bad SQL gives `{:error, {:sql, nil, message}}` and
  changes nothing; the connection is opened read-only, so no statement (not even a
  `PRAGMA query_only = 0`) can write through it.

  Options: `:timeout` - ms after which a query still running is interrupted and
  `{:error, :timeout}` returned (default 5,000), so a runaway query cannot hold the dirty
  scheduler it runs on.
  """
  @spec query(Kuma.Projection.name(), String.t(), [term()], keyword()) ::
          {:ok, %{columns: [String.t()], rows: [list()]}} | {:error, term()}
  def query(name, sql, params \\ [], opts \\ []) when is_binary(sql) and is_list(params) do
    with :ok <- Kuma.Validate.keys(opts, [:timeout]),
         timeout = Keyword.get(opts, :timeout, 5_000),
         :ok <- Kuma.Validate.positive(:timeout, timeout) do
      run_query(name, sql, params, timeout)
    end
  end

  defp run_query(name, sql, params, timeout) do
    case Registry.lookup(Kuma.Registry, {:projection, name}) do
      [{_pid, %{db: db, kind: :read_model, store: store}}] ->
        case Native.sqldb_query(db, sql, params, timeout) do
          {:ok, {columns, rows}} -> reveal(store, columns, rows)
          {:error, :store_closed} -> {:error, {:unknown_projection, name}}
          {:error, reason} -> {:error, reason}
        end

      _ ->
        # Cluster mode: on the node that runs it.
        case Kuma.Cluster.Projections.home(name) do
          {:ok, node} when node != node() -> remote_query(node, name, sql, params, timeout)
          _ -> {:error, {:unknown_projection, name}}
        end
    end
  end

  defp remote_query(node, name, sql, params, timeout) do
    :erpc.call(node, __MODULE__, :query, [name, sql, params, [timeout: timeout]], timeout + 5_000)
  catch
    :error, {:erpc, :timeout} -> {:error, :timeout}
    _, _ -> {:error, {:unreachable, node, :read_model}}
  end

  # Sensitive cells open with their subject's key as it is now (see Kuma.Sensitive).
  defp reveal(store, columns, rows) do
    with {:ok, s} <- Store.lookup(store) do
      {:ok, %{columns: columns, rows: Enum.map(rows, fn row -> Enum.map(row, &Kuma.Sensitive.from_cell(s, &1)) end)}}
    end
  rescue
    e in Kuma.Error -> {:error, e.reason}
  end
end
