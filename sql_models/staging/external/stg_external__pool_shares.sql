-- Pool-reported accepted shares per customer and day (CSV files in data/external/pool_shares/), renamed and cast.
/* config
materialized: view
*/
with source as (
    select * from external_pool_shares
),

final as (
    select
        day::date as day,
        customer_id::varchar as customer_id,
        accepted_shares::decimal(38, 9) as pool_accepted_shares
    from source
)

select * from final
