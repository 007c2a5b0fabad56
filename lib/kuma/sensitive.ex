defmodule Kuma.Sensitive do
  @moduledoc """
  A value about one data subject, stored inside another entity's events and encrypted under
  the *subject's* key.

  Bob's transfer names Alice; a support ticket quotes her email. Wrap such a value with
  `Kuma.sensitive/3`:

      Kuma.append(store, "bob", {:transfer_sent, %{to: Kuma.sensitive("alice", "Alice Liddell"), amount: 5}})

  When the event is written, the value is sealed (XChaCha20-Poly1305) under Alice's data key,
  bound to her id, and only the sealed bytes, the subject id and the placeholder are stored.
  Reading the event gives back `%Kuma.Sensitive{value: "Alice Liddell"}`. Once Alice is
  erased (`Kuma.delete/2`), her key no longer exists: the same read gives
  `%Kuma.Sensitive{erased: true, value: placeholder}`, never an exception, while Bob's
  stream keeps every event and still verifies (the hash chain covers the sealed bytes).

  Use `value/1` to get the value (or the placeholder) out of a read event or state.

  ## Placeholder

  `:placeholder` is what reading yields after the subject is erased: a fixed value (default
  `:erased`) or a partial clear value chosen at write time, e.g. the last 4 digits of a card
  number: `Kuma.sensitive(alice, card, placeholder: "**** " <> String.slice(card, -4, 4))`.
  The placeholder is stored as given (inside Bob's encrypted payload): do not put personal
  data in it that must disappear with the subject.

  ## Where decrypted values live

  * Events and snapshots on disk never hold the value, only the sealed bytes.
  * A live entity whose state holds a revealed value is recorded; erasing the subject
    passivates it, so its in-memory state is rebuilt with the placeholder.
  * The subject id itself is stored in clear inside the other entity's (encrypted) payload:
    use opaque ids (UUIDs), not emails, as entity ids.

  ## In read models and projections

  A read model that stores `value/1` of Alice's value in a row about Bob keeps her clear
  value after she is erased: `forget/1` deletes only rows keyed by the erased id. Pass the
  `%Kuma.Sensitive{}` itself as a statement parameter instead:

      def handle_event(%Kuma.Envelope{entity_id: bob, data: {:transfer_sent, %{to: to, amount: amount}}}) do
        [{"INSERT INTO transfers(entity_id, recipient, amount) VALUES (?1, ?2, ?3)", [bob, to, amount]}]
      end

  The cell then holds the sealed bytes (still under Alice's key) and `Kuma.ReadModel.query/4`
  opens them: the row reads `"Alice Liddell"` until Alice is erased, then her placeholder.
  The read model's file never holds her value in clear, so a copy of it taken before the
  erasure cannot give it back either. Such a cell can only be returned: SQL cannot compare,
  search, sort or index what it holds (each sealing differs), so key rows by ids, not by
  sensitive values.

  A projection of your own (`Kuma.Projection`) that keeps values beyond its process's life
  keeps them `redact/1`ed (sealed bytes, no clear value) and opens them when it answers,
  with `reveal/2`.

  Sensitive values need an encrypted store: on a store started with `encryption: false`,
  writing one fails with `{:error, {:invalid, :sensitive, _}}`. Writing a value about an
  already erased subject fails with `{:error, {:subject_erased, subject}}`.
  """

  alias Kuma.{Native, Store}

  @enforce_keys [:subject]
  defstruct [:subject, :value, :sealed, placeholder: :erased, erased: false]

  @type t :: %__MODULE__{
          subject: binary(),
          value: term(),
          sealed: binary() | nil,
          placeholder: term(),
          erased: boolean()
        }

  # Every term_to_binary of a term holding this struct contains its module's atom text.
  @marker "Elixir.Kuma.Sensitive"

  @doc "Wraps `value` as personal data of `subject` (see the moduledoc); raises `ArgumentError` for a bad subject."
  @spec new(binary(), term(), keyword()) :: t()
  def new(subject, value, opts \\ []) do
    with {:error, _} <- Kuma.Validate.entity_id(subject) do
      raise ArgumentError, "a sensitive value's subject must be an entity id (1..512 bytes), got: #{inspect(subject)}"
    end

    case Keyword.keys(opts) -- [:placeholder] do
      [] -> :ok
      [key | _] -> raise ArgumentError, "unknown option #{inspect(key)} for Kuma.sensitive/3"
    end

    %__MODULE__{subject: subject, value: value, placeholder: Keyword.get(opts, :placeholder, :erased)}
  end

  @doc "The value, or the placeholder once the subject is erased."
  @spec value(t()) :: term()
  def value(%__MODULE__{erased: true, placeholder: placeholder}), do: placeholder
  def value(%__MODULE__{value: value}), do: value

  @doc "Whether the subject was erased (the value is gone for good)."
  @spec erased?(t()) :: boolean()
  def erased?(%__MODULE__{erased: erased}), do: erased

  @doc """
  Every sensitive value in `term` without its clear value, keeping the sealed bytes (what
  events on disk hold). Keep values in this form where they outlive a read, and open them
  with `reveal/2` when needed.
  """
  @spec redact(term()) :: term()
  def redact(term), do: map_sensitive(term, fn v -> %{v | value: nil} end)

  @doc """
  Opens every sensitive value in `term` with its subject's key as it is now: the value, or
  `erased?/1` true (and the placeholder for `value/1`) once the subject is erased. Raises
  `Kuma.Error` if a key is missing for another reason (`:key_missing`).
  """
  @spec reveal(Kuma.store(), term()) :: term()
  def reveal(store, term) do
    case Store.lookup(store) do
      {:ok, s} -> reveal(s, term, nil)
      {:error, reason} -> raise Kuma.Error, reason: reason
    end
  end

  # A read-model cell holding a sensitive value: this prefix, then
  # term_to_binary({subject, placeholder, sealed}).
  @cell_prefix "KUMASENS\x01"

  @doc false
  # The SQL parameter a read model stores for `v`: sealed (now, if not yet), without the
  # clear value, as a BLOB that `from_cell/2` recognises.
  @spec to_cell(Store.t(), t()) :: {:ok, {:blob, binary()}} | {:error, term()}
  # A value about a subject erased before it could be sealed keeps only its placeholder.
  def to_cell(%Store{} = s, %__MODULE__{} = v) do
    case strip(s, v) do
      {:ok, %__MODULE__{subject: subject, placeholder: placeholder, sealed: sealed}} ->
        {:ok, cell(subject, placeholder, sealed)}

      {:error, {:subject_erased, subject}} ->
        {:ok, cell(subject, v.placeholder, <<>>)}

      error ->
        error
    end
  end

  defp cell(subject, placeholder, sealed),
    do: {:blob, @cell_prefix <> :erlang.term_to_binary({subject, placeholder, sealed})}

  @doc false
  # What a query answers for a cell: the value of a sensitive cell (or its placeholder once
  # the subject is erased); any other cell as it is.
  @spec from_cell(Store.t(), term()) :: term()
  def from_cell(%Store{} = s, <<@cell_prefix, rest::binary>> = cell) do
    case safe_term(rest) do
      {_subject, placeholder, <<>>} ->
        placeholder

      {subject, placeholder, sealed} when is_binary(subject) and is_binary(sealed) ->
        v = %__MODULE__{subject: subject, placeholder: placeholder, sealed: sealed}
        value(reveal_one(s, v, nil))

      _ ->
        cell
    end
  end

  def from_cell(_s, cell), do: cell

  defp safe_term(bytes) do
    :erlang.binary_to_term(bytes, [:safe])
  rescue
    ArgumentError -> nil
  end

  @doc false
  # Whether an encoded term may hold a sensitive value (a fast scan of the bytes).
  @spec in_binary?(binary()) :: boolean()
  def in_binary?(bytes), do: :binary.match(bytes, marker_pattern()) != :nomatch

  # :binary.match/2 with a plain binary compiles the pattern on every call (~0.8 µs, more
  # than decoding a 200-byte event); the compiled pattern is kept in :persistent_term
  # (~0.07 µs per scan). It is a reference, so it cannot be a module attribute.
  defp marker_pattern do
    case :persistent_term.get({__MODULE__, :pattern}, nil) do
      nil ->
        pattern = :binary.compile_pattern(@marker)
        :persistent_term.put({__MODULE__, :pattern}, pattern)
        pattern

      pattern ->
        pattern
    end
  end

  @doc false
  # Seals every not yet sealed value in `term`, keeping the clear value in memory, and
  # records that `holder` (an entity id, or nil) holds the subjects' values.
  # Returns {:ok, term} or {:error, reason}.
  @spec seal(Store.t(), term(), binary() | nil) :: {:ok, term()} | {:error, term()}
  def seal(%Store{} = s, term, holder) do
    {:ok,
     map_sensitive(term, fn v ->
       v = seal_one(s, v)
       if holder && s.sensitive_refs, do: :ets.insert(s.sensitive_refs, {v.subject, holder})
       v
     end)}
  catch
    {:kuma_sensitive_error, reason} -> {:error, reason}
  end

  @doc false
  # What is written to disk: sealed (if not yet) and with the clear value removed.
  @spec strip(Store.t(), term()) :: {:ok, term()} | {:error, term()}
  def strip(%Store{} = s, term) do
    {:ok, map_sensitive(term, fn v -> %{seal_one(s, v) | value: nil} end)}
  catch
    {:kuma_sensitive_error, reason} -> {:error, reason}
  end

  @doc false
  # After reading: opens every sealed value (or marks it erased) and records that
  # `holder` (an entity id) saw the subjects' values, so erasing them passivates it.
  @spec reveal(Store.t(), term(), binary() | nil) :: term()
  def reveal(%Store{} = s, term, holder) do
    map_sensitive(term, fn v -> reveal_one(s, v, holder) end)
  end

  defp seal_one(_s, %__MODULE__{sealed: sealed} = v) when is_binary(sealed), do: v

  defp seal_one(s, %__MODULE__{subject: subject, value: value} = v) when is_binary(subject) do
    case Native.keys_seal(s.native, subject, :erlang.term_to_binary(value)) do
      {:ok, sealed} -> %{v | sealed: sealed, erased: false}
      {:error, :entity_erased} -> throw({:kuma_sensitive_error, {:subject_erased, subject}})
      {:error, reason} -> throw({:kuma_sensitive_error, reason})
    end
  end

  defp seal_one(_s, other),
    do: throw({:kuma_sensitive_error, {:invalid, :sensitive, "malformed Kuma.Sensitive: #{inspect(other)}"}})

  defp reveal_one(s, %__MODULE__{subject: subject, sealed: sealed} = v, holder) when is_binary(sealed) do
    case Native.keys_unseal(s.native, subject, sealed) do
      {:ok, plain} ->
        if holder && s.sensitive_refs, do: :ets.insert(s.sensitive_refs, {subject, holder})
        %{v | value: :erlang.binary_to_term(plain), erased: false}

      {:error, :entity_erased} ->
        %{v | value: nil, erased: true}

      {:error, reason} ->
        raise Kuma.Error, reason: reason
    end
  end

  # Sealed bytes missing (never written by Kuma): nothing to open.
  defp reveal_one(_s, %__MODULE__{} = v, _holder), do: v

  @doc false
  # Applies `fun` to every Kuma.Sensitive inside `term` (maps, structs, lists, tuples).
  @spec map_sensitive(term(), (t() -> t())) :: term()
  def map_sensitive(%__MODULE__{} = v, fun), do: fun.(v)

  def map_sensitive(map, fun) when is_map(map),
    do: Map.new(map, fn {k, v} -> {map_sensitive(k, fun), map_sensitive(v, fun)} end)

  def map_sensitive([head | tail], fun), do: [map_sensitive(head, fun) | map_sensitive(tail, fun)]

  def map_sensitive(tuple, fun) when is_tuple(tuple),
    do: tuple |> Tuple.to_list() |> Enum.map(&map_sensitive(&1, fun)) |> List.to_tuple()

  def map_sensitive(other, _fun), do: other

  defimpl Inspect do
    def inspect(%{erased: true} = v, opts),
      do:
        Inspect.Algebra.concat([
          "#Kuma.Sensitive<",
          Kernel.inspect(v.subject),
          " erased, ",
          Inspect.Algebra.to_doc(v.placeholder, opts),
          ">"
        ])

    def inspect(v, _opts), do: "#Kuma.Sensitive<" <> Kernel.inspect(v.subject) <> " redacted>"
  end
end
