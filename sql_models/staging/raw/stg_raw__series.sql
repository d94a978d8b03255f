-- Raw series catalogue rows (one per series and day seen), renamed and cast.
/* config
materialized: view
*/
with source as (
    select * from raw_series
),

final as (
    select
        series_id::bigint as series_id,
        metric::varchar as metric,
        labels::map (varchar, varchar) as labels,
        first_seen::bigint as first_seen_ms
    from source
)

select * from final
