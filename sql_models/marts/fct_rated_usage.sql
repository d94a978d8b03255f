-- Usage priced per customer, month and price row: quantity in the billing unit, allowance applied, exact amount in minor units.
/* config
materialized: table
partitioned_by: billing_monthly
time_column: month
grain: [month, customer_id, meter_id, dimension]
group: billing
*/
with usage as (
    select * from fct_usage_by_month
    where month >= $start_date::date and month < $end_date::date
),

customer_plans as (
    select * from dim_customer_plans_by_month
    where month >= $start_date::date and month < $end_date::date
),

prices as (
    select * from stg_seeds__prices
),

meters as (
    select * from stg_seeds__meters
),

units as (
    select * from stg_seeds__units
),

customer_prices as (
    select
        customer_plans.customer_id,
        customer_plans.currency,
        customer_plans.plan_id,
        customer_plans.plan_version,
        prices.meter_id,
        prices.dimension,
        prices.included_quantity,
        prices.included_pool,
        prices.unit_price,
        prices.package_size,
        prices.price_description,
        prices.price_line,
        meters.aggregation,
        meters.billing_unit,
        units.divisor,
        customer_plans.minor_per_major
    from customer_plans
    inner join prices
        on customer_plans.plan_id = prices.plan_id
        and customer_plans.plan_version = prices.plan_version
    inner join meters
        on prices.meter_id = meters.meter_id
    inner join units
        on meters.unit = units.unit
        and meters.billing_unit = units.billing_unit
),

-- quantity in base units x 1e9, by the meter's aggregation (rule 5); exact integer arithmetic
usage_quantities as (
    select
        usage.customer_id,
        usage.meter_id,
        usage.dimension,
        case meters.aggregation
            when 'sum' then to_nano(usage.usage)
            when 'max' then to_nano(usage.gauge_peak)
            when 'avg' then
                case when usage.gauge_covered_ms > 0
                    then div_half_up(to_nano(usage.gauge_integral), usage.gauge_covered_ms)
                    else 0
                end
            when 'unit_hours' then div_half_up(to_nano(usage.gauge_integral), 3600000)
            when 'unit_months' then div_half_up(to_nano(usage.gauge_integral), usage.period_ms)
        end as quantity_nano
    from usage
    inner join meters
        on usage.meter_id = meters.meter_id
),

-- a price row with an empty dimension prices the meter's usage over all dimensions
matched as (
    select
        customer_prices.customer_id,
        customer_prices.meter_id,
        customer_prices.dimension,
        any_value(customer_prices.currency) as currency,
        any_value(customer_prices.plan_id) as plan_id,
        any_value(customer_prices.plan_version) as plan_version,
        any_value(customer_prices.included_quantity) as included_quantity,
        any_value(customer_prices.included_pool) as included_pool,
        any_value(customer_prices.unit_price) as unit_price,
        any_value(customer_prices.package_size) as package_size,
        any_value(customer_prices.price_description) as price_description,
        any_value(customer_prices.price_line) as price_line,
        any_value(customer_prices.aggregation) as aggregation,
        any_value(customer_prices.billing_unit) as billing_unit,
        any_value(customer_prices.divisor) as divisor,
        any_value(customer_prices.minor_per_major) as minor_per_major,
        coalesce(sum(usage_quantities.quantity_nano), 0)::hugeint as quantity_nano
    from customer_prices
    left join usage_quantities
        on customer_prices.customer_id = usage_quantities.customer_id
        and customer_prices.meter_id = usage_quantities.meter_id
        and (customer_prices.dimension = '' or customer_prices.dimension = usage_quantities.dimension)
    group by customer_prices.customer_id, customer_prices.meter_id, customer_prices.dimension
),

-- an allowance shared by a pool of price rows is used up in the order of the rows in prices.csv
pooled as (
    select
        *,
        max(to_nano(included_quantity) * divisor) over pool as pool_nano,
        coalesce(
            sum(quantity_nano) over (pool rows between unbounded preceding and 1 preceding),
            0
        ) as pool_used_before_nano
    from matched
    window pool as (
        partition by customer_id, coalesce(included_pool, meter_id || '/' || dimension)
        order by price_line
    )
),

allowance_applied as (
    select
        *,
        greatest(0, least(quantity_nano, pool_nano - pool_used_before_nano))::hugeint as included_nano
    from pooled
),

amounts as (
    select
        *,
        (quantity_nano - included_nano)::hugeint as billable_nano,
        case when package_size > 1
            then ceil_div(quantity_nano - included_nano, package_size::hugeint * divisor * 1000000000)
        end as packages
    from allowance_applied
),

final as (
    select
        $start_date::date as month,
        customer_id,
        plan_id,
        plan_version,
        meter_id,
        dimension,
        currency,
        aggregation,
        billing_unit
            || case aggregation when 'unit_hours' then '-hour' when 'unit_months' then '-month' else '' end
            as unit,
        from_nano(div_half_up(quantity_nano, divisor)) as quantity,
        from_nano(div_half_up(included_nano, divisor)) as included_quantity,
        from_nano(div_half_up(billable_nano, divisor)) as billable_quantity,
        unit_price,
        package_size,
        packages::bigint as packages,
        -- rule 7: one rounding, half-up to the minor unit, from the exact base-unit quantity
        case when package_size > 1
            then div_half_up(packages * to_nano(unit_price) * minor_per_major, 1000000000)
            else div_half_up(
                billable_nano * to_nano(unit_price) * minor_per_major,
                divisor::hugeint * 1000000000 * 1000000000
            )
        end::bigint as amount_minor,
        price_description
    from amounts
)

select * from final
