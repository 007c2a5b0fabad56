defmodule Kuma.Validate do
  @moduledoc false
  # The checks every public function makes on its arguments, each written once: an entity
  # id, option lists, sequence numbers, timeouts. Each returns `:ok` / `{:ok, value}` or
  # the documented `{:error, reason}` (Kuma.Error); the `!` variants raise ArgumentError
  # for the few functions documented to raise on programmer errors.

  # Mirrors kuma_core's MAX_ENTITY_ID_BYTES; checked here so a bad id is refused before
  # any process is started for it.
  @max_entity_id_bytes 512

  @doc "An entity id: a non-empty binary of at most 512 bytes."
  @spec entity_id(term()) :: :ok | {:error, term()}
  def entity_id(id) when is_binary(id) and id != "" and byte_size(id) <= @max_entity_id_bytes, do: :ok
  def entity_id(""), do: {:error, {:invalid, :entity_id, "must not be empty"}}

  def entity_id(id) when is_binary(id),
    do: {:error, {:too_large, :entity_id, byte_size(id), @max_entity_id_bytes}}

  def entity_id(_), do: {:error, {:invalid, :entity_id, "must be a binary"}}

  @doc "`entity_id/1`, raising ArgumentError."
  @spec entity_id!(term()) :: :ok
  def entity_id!(id) do
    with {:error, reason} <- entity_id(id) do
      raise ArgumentError,
            "entity id must be a non-empty binary of at most 512 bytes, got: " <>
              "#{inspect(id, limit: 5, printable_limit: 40)} (#{Kuma.Error.format(reason)})"
    end
  end

  @doc "Unknown keys are errors, not silently ignored (a typo like `shard: 8`)."
  @spec keys(term(), [atom()]) :: :ok | {:error, term()}
  def keys(opts, allowed) when is_list(opts) do
    case Enum.find(opts, fn item -> not (is_tuple(item) and tuple_size(item) == 2 and elem(item, 0) in allowed) end) do
      nil -> :ok
      {key, _} when is_atom(key) -> {:error, {:unknown_option, key}}
      other -> {:error, {:invalid, :options, "not a keyword pair: #{inspect(other)}"}}
    end
  end

  def keys(_opts, _allowed), do: {:error, {:invalid, :options, "must be a keyword list"}}

  @doc "`:expected_seq`: nil (no check) or a non-negative integer."
  @spec expected_seq(term()) :: {:ok, non_neg_integer() | nil} | {:error, term()}
  def expected_seq(nil), do: {:ok, nil}
  def expected_seq(n) when is_integer(n) and n >= 0, do: {:ok, n}
  def expected_seq(_), do: {:error, {:invalid, :expected_seq, "must be a non-negative integer"}}

  @doc """
  The events and options of an append (`Kuma.append/4`, `Kuma.Entity.append/3`), checked
  before it is routed anywhere, so that a live entity and storage refuse the same input
  alike.
  """
  @spec append(term(), keyword()) :: :ok | {:error, term()}
  def append(events, opts) do
    with :ok <- write(opts) do
      if events == [], do: {:error, {:invalid, :events, "must not be empty"}}, else: :ok
    end
  end

  @doc "The options of a write (append or execute)."
  @spec write(keyword()) :: :ok | {:error, term()}
  def write(opts), do: write(opts, [])

  @doc """
  The options of an execute: a write's, and an idempotent command's `:command_id` and
  `:since_seq` (an append takes neither: it has no command to deduplicate).
  """
  @spec execute(keyword()) :: :ok | {:error, term()}
  def execute(opts) do
    with :ok <- write(opts, [:command_id, :since_seq]), do: command_id(opts)
  end

  defp write(opts, extra_keys) do
    # (:kuma_command_id: set by Kuma itself in cluster mode, see Kuma.Cluster.Route.)
    with :ok <- keys(opts, [:expected_seq, :metadata, :timeout, :return, :kuma_command_id | extra_keys]),
         :ok <- timeout(opts),
         :ok <- return(opts),
         {:ok, _} <- expected_seq(Keyword.get(opts, :expected_seq)),
         do: :ok
  end

  @doc "`:command_id` (a binary of 1..255 bytes) and `:since_seq` (a non-negative integer) of an idempotent command."
  @spec command_id(keyword()) :: :ok | {:error, term()}
  def command_id(opts) do
    case Keyword.get(opts, :command_id) do
      id when is_nil(id) or (is_binary(id) and byte_size(id) in 1..255) ->
        non_neg(:since_seq, Keyword.get(opts, :since_seq, 0))

      _ ->
        {:error, {:invalid, :command_id, "must be a binary of 1 to 255 bytes"}}
    end
  end

  @doc "`:return` of writes: `:seq` or `:token`."
  @spec return(keyword()) :: :ok | {:error, term()}
  def return(opts) do
    if Keyword.get(opts, :return, :seq) in [:seq, :token],
      do: :ok,
      else: {:error, {:invalid, :return, "must be :seq or :token"}}
  end

  @doc "The `:timeout` in `opts` (if any): milliseconds (a non-negative integer) or `:infinity`."
  @spec timeout(keyword(), atom()) :: :ok | {:error, term()}
  def timeout(opts, key \\ :timeout) do
    case Keyword.get(opts, key, :infinity) do
      t when (is_integer(t) and t >= 0) or t == :infinity -> :ok
      _ -> {:error, {:invalid, key, "must be milliseconds (a non-negative integer) or :infinity"}}
    end
  end

  @doc "A non-negative integer option."
  @spec non_neg(atom(), term()) :: :ok | {:error, term()}
  def non_neg(_what, n) when is_integer(n) and n >= 0, do: :ok
  def non_neg(what, _), do: {:error, {:invalid, what, "must be a non-negative integer"}}

  @doc "A positive integer option."
  @spec positive(atom(), term()) :: :ok | {:error, term()}
  def positive(_what, n) when is_integer(n) and n > 0, do: :ok
  def positive(what, _), do: {:error, {:invalid, what, "must be a positive integer"}}

  @doc "Maps `fun` (returning `{:ok, value}` or an error) over `list`: `{:ok, values}` in order, or the first error."
  @spec each(list(), (term() -> {:ok, term()} | term())) :: {:ok, list()} | term()
  def each(list, fun) do
    Enum.reduce_while(list, {:ok, []}, fn x, {:ok, acc} ->
      case fun.(x) do
        {:ok, v} -> {:cont, {:ok, [v | acc]}}
        error -> {:halt, error}
      end
    end)
    |> case do
      {:ok, acc} -> {:ok, Enum.reverse(acc)}
      error -> error
    end
  end
end
