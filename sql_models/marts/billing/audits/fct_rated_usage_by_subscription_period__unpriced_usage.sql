-- Usage of a meter the plan prices, in a dimension no price row covers (e.g. an unknown model): not billed.
/* audit
blocking: false
*/
with usage as (
    select * from fct_usage_by_month
    where month >= $start_date::date and month < $end_date::date
),

periods as (
    select * from dim_subscription_periods_by_month
    where month >= $start_date::date and month < $end_date::date
),

prices as (
    select * from stg_seeds__prices
),

final as (
    select
        usage.customer_id,
        usage.meter_id,
        usage.dimension
    from usage
    inner join periods
        on usage.customer_id = periods.customer_id
    where exists (
            select 1 from prices
            where prices.plan_id = periods.plan_id
                and prices.plan_version = periods.plan_version
                and prices.meter_id = usage.meter_id
        )
        and not exists (
            select 1 from prices
            where prices.plan_id = periods.plan_id
                and prices.plan_version = periods.plan_version
                and prices.meter_id = usage.meter_id
                and (prices.dimension = '' or prices.dimension = usage.dimension)
        )
)

select * from final
order by all
